"""The distill driver's preemption handlers: installed before its input checks (a warning signal while it hashes
the teacher stops it before the first child, exit 4, instead of USR1's default action, exit 138), and put back for
an in-process caller. In-process: the driver's children are never started here."""
from __future__ import annotations

import os
import signal

import pytest

from mcd_scale.distill import driver

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "tiny", "distill.yaml")


@pytest.fixture
def callers_handlers():
    """The caller's own handlers for the two signals (a test process's, recording what reaches them)."""
    seen = []
    mine = lambda signum, frame: seen.append(signum)  # noqa: E731
    before = {sig: signal.signal(sig, mine) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    yield mine, seen
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_a_signal_during_the_input_checks_stops_before_the_first_child(tmp_path, monkeypatch, callers_handlers):
    mine, seen = callers_handlers
    teacher = tmp_path / "model.safetensors"
    teacher.write_bytes(b"stand-in")
    monkeypatch.setattr("mcd_scale.distill.checkpoints.resolve_teacher_file", lambda path, what: str(teacher))
    # the warning signal arrives while the teacher is being hashed
    monkeypatch.setattr(driver, "verify_file", lambda path: os.kill(os.getpid(), signal.SIGUSR1))

    def no_child(*args, **kwargs):
        raise AssertionError(f"a child was started after the preemption signal: {args[0]}")

    monkeypatch.setattr(driver.subprocess, "Popen", no_child)
    with pytest.raises(SystemExit) as stop:
        driver.main(["--teacher", str(teacher), "--config", CONFIG, "--out", str(tmp_path / "run")])
    assert stop.value.code == 4
    assert seen == []  # the driver's handler took the signal, not the caller's
    assert all(signal.getsignal(sig) is mine for sig in (signal.SIGUSR1, signal.SIGTERM))  # and gave them back


def test_an_input_error_gives_the_callers_handlers_back(tmp_path, callers_handlers):
    mine, _ = callers_handlers
    code = driver.main(["--teacher", str(tmp_path / "absent"), "--config", CONFIG, "--out", str(tmp_path / "run")])
    assert code == 2
    assert all(signal.getsignal(sig) is mine for sig in (signal.SIGUSR1, signal.SIGTERM))
