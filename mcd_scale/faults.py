"""Fault injection for tests and drills, driven by environment variables (all off by default).

- ``MCD_FAULT_NAN_STEPS=3,4``   the training loss of those (1-based) steps is made NaN on every rank
- ``MCD_FAULT_EXIT_AT_STEP=k``  after step k (and its checkpoint, if one is due) every rank dies with
                                ``os._exit(9)`` — a kill -9 without any clean-up
- ``MCD_FAULT_SIGTERM_AT_STEP=k`` rank 0 sends itself SIGTERM after step k (a SLURM preemption)
- ``MCD_FAULT_EXIT_IN_SAVE=k``  while saving the checkpoint of step k, after every rank has written its
                                files into ``.staging/`` but before the checkpoint is marked COMPLETE
                                and renamed into place, every rank dies with ``os._exit(9)``
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

    def poison(self, step: int) -> bool:
        return step in self.nan_steps

    def after_step(self, step: int, rank: int) -> None:
        if step in self.sigterm_at and rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        if step in self.exit_at:
            os._exit(9)

    def in_save(self, step: int) -> None:
        """Called by save_checkpoint once the staged files are written, before COMPLETE."""
        if step in self.exit_in_save:
            os._exit(9)
