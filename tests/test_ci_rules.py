"""The rules of the test run itself: in CI nothing skips; polling fails at its deadline."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import rig

TESTS = Path(__file__).resolve().parent


def _run_pytest(tmp_path, ci: str) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import sys
        import pytest
        sys.path.insert(0, {str(TESTS)!r})
        import rig

        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_makereport(item, call):
            yield from rig.skip_is_failure(item, call)
        """))
    (tmp_path / "test_some.py").write_text(textwrap.dedent("""
        import pytest

        def test_runs():
            pass

        def test_skips():
            pytest.skip("no zstd here")

        @pytest.mark.skipif(True, reason="not on this machine")
        def test_marked():
            pass

        @pytest.mark.xfail(reason="known")
        def test_expected_to_fail():
            assert False
        """))
    env = {"PATH": "/usr/bin:/bin", "CI": ci, "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                          env=env)


def test_in_ci_any_skip_fails_the_run(tmp_path):
    done = _run_pytest(tmp_path, "true")
    assert done.returncode == 1, done.stdout
    summary = done.stdout.strip().splitlines()[-1]
    # a skip in the test fails it; a skipif (at setup) is an error: either fails the run
    assert "1 failed, 1 passed, 1 xfailed, 1 error" in summary and "skipped" not in summary
    assert "skipped in CI, where no test may skip: Skipped: no zstd here" in done.stdout
    assert "skipped in CI, where no test may skip: Skipped: not on this machine" in done.stdout


def test_outside_ci_a_skip_stays_a_skip(tmp_path):
    done = _run_pytest(tmp_path, "false")
    assert done.returncode == 0 and "1 passed, 2 skipped, 1 xfailed" in done.stdout


def test_a_polling_loop_fails_when_its_deadline_passes():
    started = time.monotonic()
    with pytest.raises(AssertionError, match="the part was logged: not within 0.3 s"):
        rig.wait_until(lambda: False, 0.3, "the part was logged")
    assert time.monotonic() - started < 2
    assert rig.wait_until(lambda: [1], 1, "x") == [1]
