#!/usr/bin/env python3
"""Build dist/zfsmgr.pyz: zfsmgr plus its pinned pure-Python dependencies, reproducibly.

- Versions come from setup.cfg (install_requires + the `vendor` extra); wheels are fetched once
  with pip into build/wheels and must be pure (py3-none-any): no compiled code in the zipapp.
- minio 7.2's package __init__ imports MinioAdmin, whose crypto needs argon2-cffi and
  pycryptodome (compiled). zfsmgr uses only minio.Minio, so the build drops minioadmin.py and
  crypto.py and removes that one import line (checked: the build fails if it is not there).
- Same sources and wheels -> same bytes: sorted entries, fixed timestamps and modes.
"""

from __future__ import annotations

import configparser
import io
import os
import re
import stat
import subprocess
import sys
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


def wheel_for(pin: str) -> Path:
    """The cached wheel of a pin, downloading it with pip when missing."""
    name, version = pin.split("==")
    pattern = re.compile(re.sub(r"[-_.]+", "[-_.]", name) + "-" + re.escape(version) + "-",
                         re.IGNORECASE)
    found = [w for w in WHEELS.glob("*.whl") if pattern.match(w.name)] if WHEELS.is_dir() else []
    if not found:
        WHEELS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary=:all:", "--dest", str(WHEELS), pin], check=True)
        found = [w for w in WHEELS.glob("*.whl") if pattern.match(w.name)]
    if len(found) != 1:
        sys.exit(f"build_zipapp: expected one wheel for {pin}, found {found}")
    if not found[0].name.endswith("-none-any.whl"):
        sys.exit(f"build_zipapp: {found[0].name} is not pure Python")
    return found[0]


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
    import hashlib

    out = build()
    print(f"{out.relative_to(ROOT)} {out.stat().st_size} bytes"
          f" sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}")
