"""Fault injection for tests and drills, driven by environment variables (all off by default).

- ``MCD_FAULT_NAN_STEPS=3,4``   the training loss of those (1-based) steps is made NaN on every rank
- ``MCD_FAULT_EXIT_AT_STEP=k``  after step k (and its checkpoint, if one is due) every rank dies with
                                ``os._exit(9)`` — a kill -9 without any clean-up
- ``MCD_FAULT_SIGTERM_AT_STEP=k`` rank 0 sends itself SIGTERM after step k (a SLURM preemption)
- ``MCD_FAULT_EXIT_IN_SAVE=k``  while saving the checkpoint of step k, after every rank has written its
                                files into ``.staging/`` but before the checkpoint is marked COMPLETE
                                and renamed into place, every rank dies with ``os._exit(9)``
- ``MCD_FAULT_PAUSE_AT_STEP=k`` with ``MCD_FAULT_PAUSE_DIR``: after step k rank 0 waits for a preemption
                                signal (:func:`pause_for_preemption`)
"""
from __future__ import annotations

import os
import signal


def _steps(name: str) -> set[int]:
    raw = os.environ.get(name, "").strip()
    return {int(x) for x in raw.split(",") if x.strip()} if raw else set()


class Faults:
    def __init__(self) -> None:
        self.nan_steps = _steps("MCD_FAULT_NAN_STEPS")
        self.exit_at = _steps("MCD_FAULT_EXIT_AT_STEP")
        self.sigterm_at = _steps("MCD_FAULT_SIGTERM_AT_STEP")
        self.exit_in_save = _steps("MCD_FAULT_EXIT_IN_SAVE")
        self.pause_at = _steps("MCD_FAULT_PAUSE_AT_STEP")

    def poison(self, step: int) -> bool:
        return step in self.nan_steps

    def after_step(self, step: int, rank: int) -> None:
        if step in self.pause_at and rank == 0:
            pause_for_preemption(f"train-step{step}")
        if step in self.sigterm_at and rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        if step in self.exit_at:
            os._exit(9)

    def in_save(self, step: int) -> None:
        """Called by save_checkpoint once the staged files are written, before COMPLETE."""
        if step in self.exit_in_save:
            os._exit(9)


PAUSE_DIR_ENV = "MCD_FAULT_PAUSE_DIR"


def pause_for_preemption(name: str, timeout_s: float = 120.0) -> None:
    """A deterministic window for an external preemption (tests of the SLURM scripts under a fake SLURM).

    With ``MCD_FAULT_PAUSE_DIR`` set, the first call for ``name`` creates ``DIR/name`` (one-shot: a resumed
    run finds it and goes on) and waits up to ``timeout_s`` for SIGUSR1/SIGTERM; the handler already installed
    (the trainer's or precompute's preemption flag) still runs. The fake ``sbatch`` watches DIR and delivers
    ``--signal=B:USR1`` to the batch shell when a marker appears, so the signal reaches a run mid-stage
    without any timing guess. Callers: the trainer after step ``MCD_FAULT_PAUSE_AT_STEP`` (rank 0), the
    precompute tool after ``MCD_FAULT_PAUSE_AFTER_SHARDS`` shards (rank 0).
    """
    import time

    directory = os.environ.get(PAUSE_DIR_ENV, "")
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    try:
        fd = os.open(os.path.join(directory, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    got = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}

    def _seen(signum, frame):
        got.append(signum)
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)

    for sig in previous:
        signal.signal(sig, _seen)
    try:
        deadline = time.monotonic() + timeout_s
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
