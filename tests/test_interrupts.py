"""client/interrupts.py with real signals in this process: a held interrupt waits, a second one
or the patience running out breaks in, an ignored signal stays ignored, off the main thread
nothing is held."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from zfsmgr.client.interrupts import Held


@pytest.fixture
def handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as the CLI's: KeyboardInterrupt
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_held_interrupt_waits_for_the_block_and_a_second_breaks_in(handlers):
    with Held(5) as held:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the request goes on
        assert held.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler  # restored
    with pytest.raises(KeyboardInterrupt):
        with Held(5):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
            pytest.fail("the second interrupt did not break in")


def test_the_patience_bounds_the_wait_and_a_failure_becomes_the_interrupt(handlers):
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with Held(0.5):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert time.monotonic() - started < 3
    with pytest.raises(KeyboardInterrupt):  # the request failed after the interrupt: it wins
        with Held(5):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            raise OSError("connection reset")


def test_an_ignored_signal_stays_ignored_and_other_threads_hold_nothing(handlers):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with Held(5) as held:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
    assert held.signum == 0 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    seen = []

    def worker():
        with Held(5) as inner:
            seen.append(inner._saved)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [None]
