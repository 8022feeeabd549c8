"""systemd units for the server and the client, hardened, printed or installed.

`zfsmgr server systemd-unit` makes `zfsmgr-server.service` (`systemctl reload` re-reads the
TLS certificate) and `zfsmgr-rotate.service`/`.timer` (the server's own daily `server rotate`,
which deletes for append-only clients); `zfsmgr client systemd-units`
makes `zfsmgr-backup.service` (a oneshot `client backup`) and `zfsmgr-backup.timer`
(`Persistent=true`: a run missed while the host was off happens at boot; `RandomizedDelaySec=`
spreads a fleet's backups so they do not all hit the server on the hour). Both services run
with the file system read-only except their own directories, no new privileges, no devices
but /dev/zfs where zfs is needed, and the kernel's tunables, modules, logs and clock out of
reach. `--install` writes the files (atomically) into the unit directory; systemctl is left
to the admin.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Sequence

from zfsmgr.errors import UsageError
from zfsmgr.settings import as_duration

UNIT_DIR = "/etc/systemd/system"
DEFAULT_PROGRAM = "/usr/local/bin/zfsmgr"

HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "PrivateTmp=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "RestrictSUIDSGID=yes",
    "RestrictRealtime=yes",
    "RestrictNamespaces=yes",
    "LockPersonality=yes",
    "MemoryDenyWriteExecute=yes",
    "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    "UMask=0077",
)
# zfs talks to the kernel through /dev/zfs (zfs-fuse: a unix socket) and needs CAP_SYS_ADMIN
ZFS_ACCESS = (
    "DevicePolicy=closed",
    "DeviceAllow=/dev/zfs rw",
    "CapabilityBoundingSet=CAP_SYS_ADMIN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER"
    " CAP_CHOWN",
)
NO_DEVICES = ("PrivateDevices=yes", "CapabilityBoundingSet=")


def program() -> str:
    """The zipapp running now (its absolute path), else the usual install path."""
    path = Path(sys.argv[0]).absolute() if sys.argv and sys.argv[0] else None
    if path and path.is_file() and zipfile.is_zipfile(path):
        return str(path)
    return DEFAULT_PROGRAM


def _exec(python: str, zipapp: str, *args: str) -> str:
    return " ".join(shlex.quote(a) for a in (python, "-I", "-S", zipapp, *args))


def _unit(sections: Dict[str, Sequence[str]]) -> str:
    text = ["# made by `zfsmgr`; edit with `systemctl edit` (drop-ins survive a regeneration)"]
    for name, lines in sections.items():
        text += ["", f"[{name}]", *lines]
    return "\n".join(text) + "\n"


def server_unit(python: str, zipapp: str, workdir: str, user: str = "", zfs: bool = False,
                writable: Sequence[str] = ()) -> Dict[str, str]:
    """{file name: text} of the server's service, and of its daily rotation and timer."""
    confined = [
        f"WorkingDirectory={workdir}",
        *([f"User={user}", f"Group={user}"] if user else []),
        f"ReadWritePaths={' '.join([workdir, *writable])}",
        "ProtectHome=yes",
        *HARDENING,
        *(ZFS_ACCESS if zfs else NO_DEVICES),
    ]
    service = [
        "Type=simple",
        f"ExecStart={_exec(python, zipapp, 'server', 'serve')}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartSec=5s",
        "TimeoutStopSec=60s",
        "LimitNOFILE=65536",
        *confined,
    ]
    return {"zfsmgr-server.service": _unit({
        "Unit": ["Description=zfsmgr backup server", "Wants=network-online.target",
                 "After=network-online.target"],
        "Service": service,
        "Install": ["WantedBy=multi-user.target"]}),
        "zfsmgr-rotate.service": _unit({
            "Unit": ["Description=zfsmgr server rotation (every client's policy and quota)",
                     "After=zfsmgr-server.service"],
            "Service": ["Type=oneshot", f"ExecStart={_exec(python, zipapp, 'server', 'rotate')}",
                        "Nice=10", *confined]}),
        "zfsmgr-rotate.timer": _unit({
            "Unit": ["Description=zfsmgr server rotation, daily"],
            "Timer": ["OnCalendar=daily", "RandomizedDelaySec=30m", "Persistent=true"],
            "Install": ["WantedBy=timers.target"]})}


def client_units(python: str, zipapp: str, workdir: str, on_calendar: str = "hourly",
                 delay: str = "15m") -> Dict[str, str]:
    """{file name: text} of the client's backup service and its timer."""
    service = [
        "Type=oneshot",
        f"ExecStart={_exec(python, zipapp, 'client', 'backup')}",
        f"WorkingDirectory={workdir}",
        "StateDirectory=zfsmgr-client",  # root's default STATE_DIR: shared with cron and shells
        "StateDirectoryMode=0700",
        "Nice=10",
        "IOSchedulingClass=idle",
        "TimeoutStartSec=infinity",
        "ProtectHome=read-only",
        *HARDENING,
        *ZFS_ACCESS,
    ]
    return {
        "zfsmgr-backup.service": _unit({
            "Unit": ["Description=zfsmgr backup of this host to the backup server",
                     "Wants=network-online.target", "After=network-online.target zfs.target"],
            "Service": service}),
        "zfsmgr-backup.timer": _unit({
            "Unit": [f"Description=zfsmgr backup of this host, {on_calendar}"],
            "Timer": [f"OnCalendar={on_calendar}", f"RandomizedDelaySec={delay}",
                      "Persistent=true", "AccuracySec=1min"],
            "Install": ["WantedBy=timers.target"]})}


def add_arguments(parser: argparse.ArgumentParser, workdir: str) -> None:
    """The options both commands share."""
    parser.add_argument("--install", action="store_true",
                        help="write the units into --unit-dir instead of printing them")
    parser.add_argument("--unit-dir", default=UNIT_DIR, help=f"default {UNIT_DIR}")
    parser.add_argument("--workdir", default=workdir,
                        help=f"the directory with the .env (default {workdir})")
    parser.add_argument("--program", default="",
                        help="the zfsmgr zipapp (default: this one, else /usr/local/bin/zfsmgr)")
    parser.add_argument("--python", default=sys.executable or "/usr/bin/python3",
                        help="the interpreter (default: this one)")


def emit(units: Dict[str, str], install: bool, unit_dir: str, enable: List[str]) -> int:
    """Print the units, or write them into `unit_dir` and say how to start them."""
    if not install:
        for name, text in units.items():
            print(f"# {os.path.join(unit_dir, name)}")
            print(text)
        return 0
    from zfsmgr.files import write_atomic

    folder = Path(unit_dir)
    if not folder.is_dir():
        raise UsageError(f"unit directory {unit_dir} does not exist")
    for name, text in units.items():
        try:
            write_atomic(folder / name, text.encode(), mode=0o644)
        except OSError as exc:  # not root, a read-only folder: say so in one line
            raise UsageError(f"cannot write {folder / name}: {exc.strerror or exc}"
                             " (--install needs root, or --unit-dir)") from None
        print(f"wrote {folder / name}")
    print(f"now: systemctl daemon-reload && systemctl enable --now {' '.join(enable)}")
    return 0


def checked_delay(text: str) -> str:
    """RandomizedDelaySec as given, once it parses as a duration."""
    try:
        as_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected {exc}") from None
    return text.strip()
