#!/usr/bin/env python3
"""Build dist/zfsmgr.pyz: zfsmgr plus its pinned pure-Python dependencies, reproducibly.

- Versions come from setup.cfg (install_requires + the `vendor` extra); each pinned wheel's sha256
  is in WHEEL_SHA256 below. Wheels are fetched once with pip (`--require-hashes`) into
  build/wheels and must be pure (py3-none-any): no compiled code in the zipapp. A cached wheel is
  used only when its bytes have the pinned sha256 (not because of its name); one that does not is
  fetched again, and the build stops if pip's copy does not match either.
- minio 7.2's package __init__ imports MinioAdmin, whose crypto needs argon2-cffi and
  pycryptodome (compiled). zfsmgr uses only minio.Minio, so the build drops minioadmin.py and
  crypto.py and removes that one import line (checked: the build fails if it is not there).
- Same sources and wheels -> same bytes: sorted entries, fixed timestamps and modes.
"""

from __future__ import annotations

import configparser
import hashlib
import io
import os
import re
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WHEELS = ROOT / "build" / "wheels"
OUTPUT = ROOT / "dist" / "zfsmgr.pyz"
EPOCH = (1980, 1, 1, 0, 0, 0)
MINIO_ADMIN_IMPORT = "from .minioadmin import MinioAdmin as MinioAdmin\n"
DROPPED = {"minio/minioadmin.py", "minio/crypto.py"}
MAIN = b"""import sys

from zfsmgr.cli import main

sys.exit(main(sys.argv[1:]))
"""


def pinned() -> list:
    """name==version pins of the runtime and the vendor extra, from setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    lines += cfg["options.extras_require"]["vendor"].splitlines()
    pins = [line.split("#")[0].strip() for line in lines]
    pins = [p for p in pins if p]
    for pin in pins:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.]+", pin):
            sys.exit(f"build_zipapp: {pin!r} in setup.cfg is not pinned as name==version")
    return pins


# The wheels the zipapp vendors, by file name (the pins of setup.cfg), and their sha256. To move
# a pin: change setup.cfg, `pip download --no-deps --only-binary=:all: NAME==VERSION`, check the
# wheel against PyPI's published sha256, and put its name and sha256 here.
WHEEL_SHA256 = {
    "bottle-0.13.4-py2.py3-none-any.whl":
        "045684fbd2764eac9cdeb824861d1551d113e8b683d8d26e296898d3dd99a12e",
    "waitress-3.0.2-py3-none-any.whl":
        "c56d67fd6e87c2ee598b76abdd4e96cfad1f24cacdea5078d382b1f9d7b5ed2e",
    "minio-7.2.20-py3-none-any.whl":
        "eb33dd2fb80e04c3726a76b13241c6be3c4c46f8d81e1d58e757786f6501897e",
    "python_dotenv-1.1.1-py3-none-any.whl":
        "31f23644fe2602f88ff55e1f5c79ba497e01224ee7737937930c448e4d0e24dc",
    "urllib3-2.5.0-py3-none-any.whl":
        "e6b01673c0fa6a13e374b50871808eb3bf7046c4b125b216f6bf1cc604cff0dc",
    "certifi-2026.5.20-py3-none-any.whl":
        "3c52e209ba0a4ad7aebe60436a4ab349c39e1e602e8c134221e546902ad25897",
    "typing_extensions-4.15.0-py3-none-any.whl":
        "f0fa19c6845758ab08074a0cfa8b7aecb71c999ca73d62883bc25cc018c4e548",
}


def sha256_of(path: Path) -> str:
    """The sha256 hex of a file, read in bounded chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pinned_wheel(pin: str) -> tuple:
    """(file name, sha256) of the wheel pinned for `name==version`."""
    name, version = pin.split("==")
    pattern = re.compile(re.sub(r"[-_.]+", "[-_.]", name) + "-" + re.escape(version) + "-",
                         re.IGNORECASE)
    found = [(w, h) for w, h in WHEEL_SHA256.items() if pattern.match(w)]
    if len(found) != 1:
        sys.exit(f"build_zipapp: no sha256 pinned for {pin} in WHEEL_SHA256 (found {found})")
    if not found[0][0].endswith("-none-any.whl"):
        sys.exit(f"build_zipapp: {found[0][0]} is not pure Python")
    return found[0]


def download(pin: str, sha256: str, dest: Path) -> None:
    """Fetch the wheel of `pin` into `dest` with pip, which checks it against `sha256`."""
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{pin} --hash=sha256:{sha256}\n")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                               "--only-binary=:all:", "--require-hashes", "--dest", str(dest),
                               "-r", str(requirements)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()
                 and not line.startswith("WARNING: Location")]
        sys.exit(f"build_zipapp: pip could not fetch {pin}: " + " ".join(lines[-6:]))


def wheel_for(pin: str) -> Path:
    """The wheel of a pin: the cached one if its bytes have the pinned sha256, else pip's."""
    filename, sha256 = pinned_wheel(pin)
    cached = WHEELS / filename
    if cached.is_file() and sha256_of(cached) == sha256:
        return cached
    WHEELS.mkdir(parents=True, exist_ok=True)
    if cached.exists():
        print(f"build_zipapp: cached {filename} does not have its pinned sha256: fetching it"
              " again", file=sys.stderr)
        cached.unlink()
    download(pin, sha256, WHEELS)
    if not cached.is_file() or sha256_of(cached) != sha256:
        sys.exit(f"build_zipapp: the downloaded {filename} does not have the pinned sha256"
                 f" {sha256}")
    return cached


def entries() -> dict:
    """archive name -> bytes."""
    files = {"__main__.py": MAIN}
    for path in sorted((ROOT / "zfsmgr").rglob("*.py")):
        files[path.relative_to(ROOT).as_posix()] = path.read_bytes()
    for pin in pinned():
        with zipfile.ZipFile(wheel_for(pin)) as wheel:
            for info in wheel.infolist():
                name = info.filename
                if info.is_dir() or name.endswith((".pyc", "/RECORD")) or name in DROPPED:
                    continue
                if name.endswith((".so", ".pyd", ".dylib")):
                    sys.exit(f"build_zipapp: compiled file {name} in {pin}")
                files[name] = wheel.read(name)
    init = files["minio/__init__.py"].decode()  # novermin (bytes, not str)
    if MINIO_ADMIN_IMPORT not in init:
        sys.exit("build_zipapp: minio/__init__.py changed; review the MinioAdmin workaround")
    files["minio/__init__.py"] = init.replace(MINIO_ADMIN_IMPORT, "").encode()
    return files


def build() -> Path:
    """Write the zipapp and return its path."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, data in sorted(entries().items()):
            info = zipfile.ZipInfo(name, EPOCH)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUTPUT.with_suffix(".tmp")
    tmp.write_bytes(b"#!/usr/bin/env python3\n" + buffer.getvalue())
    os.chmod(tmp, 0o755)
    os.replace(tmp, OUTPUT)
    return OUTPUT


if __name__ == "__main__":
    out = build()
    print(f"{out.relative_to(ROOT)} {out.stat().st_size} bytes"
          f" sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}")
