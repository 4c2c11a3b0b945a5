"""Fault injection for tests and drills, driven by environment variables (all off by default).

**Between steps, on every rank** (:class:`Faults`):

- ``MCD_FAULT_NAN_STEPS=3,4``   the training loss of those (1-based) steps is made NaN on every rank
- ``MCD_FAULT_EXIT_AT_STEP=k``  after step k (and its checkpoint, if one is due) every rank dies with
                                ``os._exit(9)`` — a kill -9 without any clean-up
- ``MCD_FAULT_SIGTERM_AT_STEP=k`` rank 0 sends itself SIGTERM after step k (a SLURM preemption)
- ``MCD_FAULT_EXIT_IN_SAVE=k``  while saving the checkpoint of step k, after every rank has written its
                                files into ``.staging/`` but before the checkpoint is marked COMPLETE
                                and renamed into place, every rank dies with ``os._exit(9)``
- ``MCD_FAULT_PAUSE_AT_STEP=k`` with ``MCD_FAULT_PAUSE_DIR``: after step k rank 0 waits for a preemption
                                signal (:func:`pause_for_preemption`)

**Inside a step, on ONE rank** (:func:`install`): these act in the middle of a step's
backward on one chosen rank, where a real failure strikes (the peers are then inside, or about to enter,
the gradient reduction and the step's collective). Each variable is ``RANK:STEP[,STEP...]`` with 1-based
optimizer steps:

- ``MCD_FAULT_RANK_DIES=1:3``     rank 1 dies with ``os._exit(9)`` in step 3's backward (a kill -9, a lost node)
- ``MCD_FAULT_RANK_HANGS=1:3``    rank 1 stops in step 3's backward and never returns (a hung device or host)
- ``MCD_FAULT_NONFINITE_GRAD=1:2,3`` rank 1's gradient of one parameter is non-finite in steps 2 and 3 while
                                  its loss stays finite; ``MCD_FAULT_NONFINITE_VALUE=inf`` makes it +Inf
                                  (default nan)

The step is read from the DeepSpeed engine (``global_steps`` + 1), which a resume restores, so a step
number means the same step in a resumed run.

``MCD_FAULT_SIGNAL_AFTER_WORK=1``: the precompute tool and ``mcd_scale/train.py`` send themselves SIGUSR1 after
their work returned (:func:`signal_self_after_work`).

``MCD_FAULT_SAMPLE_LOG=DIR`` records the samples every rank consumes (:class:`SampleLog`, the soak test).
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Callable, Optional

import torch


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


SIGNAL_AFTER_WORK_ENV = "MCD_FAULT_SIGNAL_AFTER_WORK"


def signal_self_after_work() -> None:
    """With ``MCD_FAULT_SIGNAL_AFTER_WORK=1`` this process sends itself SIGUSR1 (SLURM's warning signal): called
    by the precompute tool and by ``mcd_scale/train.py`` once their work has returned, it reproduces, without any
    timing guess, a rank that finished its last shard or step before the warning signal reached it. The signal is
    delivered before this returns."""
    if os.environ.get(SIGNAL_AFTER_WORK_ENV, "") not in ("", "0"):
        os.kill(os.getpid(), signal.SIGUSR1)


ENV_DIES = "MCD_FAULT_RANK_DIES"
ENV_HANGS = "MCD_FAULT_RANK_HANGS"
ENV_NONFINITE = "MCD_FAULT_NONFINITE_GRAD"
ENV_VALUE = "MCD_FAULT_NONFINITE_VALUE"


def parse(raw: str) -> tuple[Optional[int], set[int]]:
    """'1:2,3' -> (1, {2, 3}); '' -> (None, set())."""
    raw = raw.strip()
    if not raw:
        return None, set()
    rank, _, steps = raw.partition(":")
    return int(rank), {int(s) for s in steps.split(",") if s.strip()}


def active() -> bool:
    return any(os.environ.get(k, "").strip() for k in (ENV_DIES, ENV_HANGS, ENV_NONFINITE))


def install(module: torch.nn.Module, rank: int, current_step: Callable[[], int]) -> None:
    """Hook the first trainable parameter's gradient on ``rank`` when a variable names it."""
    if not active():
        return
    param = next((p for p in module.parameters() if p.requires_grad), None)
    if param is None:
        return
    dies, hangs, nonfinite = (parse(os.environ.get(k, "")) for k in (ENV_DIES, ENV_HANGS, ENV_NONFINITE))
    value = float("inf") if os.environ.get(ENV_VALUE, "nan").strip().lower() == "inf" else float("nan")

    def hook(grad: torch.Tensor) -> torch.Tensor:
        step = current_step()
        if dies[0] == rank and step in dies[1]:
            print(f"[fault] rank {rank} dies in step {step} at {time.time():.3f}", flush=True)
            os._exit(9)
        if hangs[0] == rank and step in hangs[1]:
            print(f"[fault] rank {rank} hangs in step {step} at {time.time():.3f}", flush=True)
            while True:
                time.sleep(60)
        if nonfinite[0] == rank and step in nonfinite[1]:
            return grad + value  # every element non-finite; the loss is untouched
        return grad

    param.register_hook(hook)


ENV_SAMPLE_LOG = "MCD_FAULT_SAMPLE_LOG"


class SampleLog:
    """``MCD_FAULT_SAMPLE_LOG=DIR``: every rank appends the sample ids and batch positions it consumes at each
    step to ``DIR/rank{r}.jsonl`` (append-only across restarts, so a re-executed step appears again; the last
    record of a step is the one the final weights saw). The soak test (tests/faults/test_soak.py) checks from
    these files that no sample is lost or duplicated per epoch over many forced restarts."""

    def __init__(self, directory: str, rank: int):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"rank{rank}.jsonl")
        self.run = f"{os.getpid()}-{time.time():.6f}"

    @classmethod
    def from_env(cls, rank: int) -> Optional["SampleLog"]:
        directory = os.environ.get(ENV_SAMPLE_LOG, "").strip()
        return cls(directory, rank) if directory else None

    def record(self, step: int, micro_batches: list) -> None:
        ids = [int(i) for mb in micro_batches for i in mb["sample_id"].tolist()]
        pos = [int(p) for mb in micro_batches for p in mb["position"].tolist()]
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"run": self.run, "step": step, "ids": ids, "pos": pos}) + "\n")
