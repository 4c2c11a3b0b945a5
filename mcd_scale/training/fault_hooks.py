"""Faults injected inside a step on ONE rank (tests/faults, tools/faults.py); all off by default.

``mcd_scale/training/faults.py`` injects faults between steps on every rank; these act in the middle of a step's
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
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch

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
        import json

        ids = [int(i) for mb in micro_batches for i in mb["sample_id"].tolist()]
        pos = [int(p) for mb in micro_batches for p in mb["position"].tolist()]
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"run": self.run, "step": step, "ids": ids, "pos": pos}) + "\n")
