#!/usr/bin/env bash
# The test command (README "Run the tests"): lint, Python 3.9 floor, zipapp, the suite on
# zfs-fuse and SeaweedFS, then the OpenZFS VM tier. Fails if any test was skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export CI="${CI:-true}"

echo "== lint (flake8) and Python floor (vermin -t=3.9)"
python3 -m flake8 zfsmgr build_zipapp.py tests
"$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/vermin" -q --no-tips --violations -t=3.9- --eval-annotations zfsmgr build_zipapp.py

echo "== build the zipapp (twice: reproducible)"
a=$(python3 build_zipapp.py | awk '{print $NF}')
b=$(python3 build_zipapp.py | awk '{print $NF}')
[ "$a" = "$b" ] || { echo "zipapp build is not reproducible: $a vs $b"; exit 1; }
(cd "$(mktemp -d)" && python3 -I -S "$OLDPWD/dist/zfsmgr.pyz" --version)

image_pid=
if [ "${ZFSMGR_SKIP_VM:-}" != 1 ]; then
  # The VM image (cached by its inputs; 6-10 min to build on a fresh machine) is made while
  # the host suite runs, so the two slow steps overlap.
  echo "== OpenZFS VM image: ensured in the background (tests/openzfs/image.sh)"
  image_log=$(mktemp)
  bash tests/openzfs/image.sh >/dev/null 2>"$image_log" &
  image_pid=$!
fi

echo "== pytest on zfs-fuse and SeaweedFS"
report=$(mktemp)
set +e
python3 -m pytest -p no:cacheprovider -ra -m "not openzfs" "$@" | tee "$report"
status=${PIPESTATUS[0]}
set -e
if grep -qE "^SKIPPED|[0-9]+ skipped" "$report"; then  # conftest fails skips in CI; belt and braces
  echo "FAIL: tests were skipped"; exit 1
fi
[ "$status" -eq 0 ] || exit "$status"

if [ "${ZFSMGR_SKIP_VM:-}" = 1 ]; then
  echo "== OpenZFS VM tier skipped (ZFSMGR_SKIP_VM=1)"
elif [ -x tests/openzfs/run-tier.sh ] || [ -f tests/openzfs/run-tier.sh ]; then
  if [ -n "$image_pid" ] && ! wait "$image_pid"; then
    cat "$image_log"; echo "FAIL: the OpenZFS VM image could not be built"; exit 125
  fi
  echo "== OpenZFS 2.3 tier in a VM"
  bash tests/openzfs/run-tier.sh
fi
