"""The shipped systemd units: hardened, the client's timer persistent and spread, and accepted by
`systemd-analyze verify` (parse warnings count as failures: verify itself exits 0 on them)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import rig


def verify(*paths):
    if not shutil.which("systemd-analyze"):
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is required in CI (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed")
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, paths)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    return proc


def settings_of(text):
    return [line for line in text.splitlines() if "=" in line and not line.startswith("#")]


def test_client_units_install_and_verify(pyz, tmp_path):
    done = rig.run_zfsmgr(["client", "systemd-units", "--install", "--unit-dir", str(tmp_path),
                           "--on-calendar", "*-*-* 02:30:00", "--randomized-delay", "45m"],
                          check=True)
    assert "systemctl enable --now zfsmgr-backup.timer" in done.stdout
    service = (tmp_path / "zfsmgr-backup.service").read_text()
    timer = (tmp_path / "zfsmgr-backup.timer").read_text()
    assert f"-I -S {pyz} client backup" in service
    for wanted in ("Type=oneshot", "NoNewPrivileges=yes", "ProtectSystem=strict",
                   "WorkingDirectory=/etc/zfsmgr", "DeviceAllow=/dev/zfs rw",
                   "StateDirectory=zfsmgr-client"):
        assert wanted in settings_of(service), wanted
    for wanted in ("OnCalendar=*-*-* 02:30:00", "Persistent=true", "RandomizedDelaySec=45m",
                   "WantedBy=timers.target"):
        assert wanted in settings_of(timer), wanted
    verify(tmp_path / "zfsmgr-backup.service", tmp_path / "zfsmgr-backup.timer")
    printed = rig.run_zfsmgr(["client", "systemd-units"], check=True).stdout
    assert "# /etc/systemd/system/zfsmgr-backup.timer" in printed and "Persistent=true" in printed
    bad = rig.run_zfsmgr(["client", "systemd-units", "--randomized-delay", "soon"])
    assert bad.returncode == 2 and "randomized-delay" in bad.stderr


@pytest.mark.parametrize("extra", [[], ["--zfs", "--user", "zfsmgr", "--rw", "/srv/backups"]])
def test_server_unit_install_and_verify(pyz, tmp_path, extra):
    rig.run_zfsmgr(["server", "systemd-unit", "--install", "--unit-dir", str(tmp_path),
                    "--workdir", "/var/lib/zfsmgr", *extra], check=True)
    unit = tmp_path / "zfsmgr-server.service"
    lines = settings_of(unit.read_text())
    assert f"ExecStart={rig.sys.executable} -I -S {pyz} server serve" in lines
    for wanted in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                   "PrivateTmp=yes", "MemoryDenyWriteExecute=yes", "Restart=on-failure"):
        assert wanted in lines, wanted
    if extra:
        assert "User=zfsmgr" in lines and "DeviceAllow=/dev/zfs rw" in lines
        assert "ReadWritePaths=/var/lib/zfsmgr /srv/backups" in lines
    else:
        assert "PrivateDevices=yes" in lines and "CapabilityBoundingSet=" in lines
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "zfsmgr-rotate.service", "zfsmgr-rotate.timer", "zfsmgr-server.service"]
    verify(*sorted(tmp_path.iterdir()))
    missing = rig.run_zfsmgr(["server", "systemd-unit", "--install", "--unit-dir",
                              str(tmp_path / "nope")])
    assert missing.returncode == 2 and "does not exist" in missing.stderr
