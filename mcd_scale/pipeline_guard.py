"""The non-finite-loss policy for DeepSpeed's pipeline engine (the PP menu).

The plain engine checks each micro-batch's loss before its backward (mcd_scale/engine.py). The
pipeline engine runs forward, backward and the optimizer step inside one ``train_batch`` schedule, and
only the last stage ever sees a loss, so the same policy needs two hooks:

1. the last stage's loss function is wrapped: a non-finite loss (or a poisoned one, for fault
   injection) is recorded and replaced by a zero that is connected to the graph through finite values
   only, so the backward sends zero gradients up the pipeline instead of NaNs;
2. the schedule's ``OptimizerStep`` instruction is wrapped, on this engine instance only: every rank
   reaches it after its last send/receive of the batch, all ranks agree (all-reduce MAX over the world)
   whether any last stage saw a bad loss, and if so the step runs with the learning rate scaled to 0 —
   exactly what the plain engine does, so a skipped step leaves PP and DP runs in the same state
   (tests/test_train_teacher.py::test_pp2_skips_a_nonfinite_step_like_pp1).
"""
from __future__ import annotations

from typing import Callable

import torch


class PipelineNonFiniteGuard:
    """Install on a PipelineEngine; call :meth:`begin` before and :meth:`skipped` after ``train_batch``."""

    def __init__(self, engine, loss_fn: Callable, any_rank: Callable[[bool], bool],
                 set_lr_scale: Callable[[float], list], restore_lr: Callable[[list], None]):
        from deepspeed.runtime.pipe import schedule

        self.engine, self.loss_fn = engine, loss_fn
        self.poison = False
        self.nonfinite_local = False  # this rank's last stage saw a bad loss in the current batch
        self.skip = False  # the agreed decision of the last optimizer step
        step = type(engine)._INSTRUCTION_MAP[schedule.OptimizerStep]

        def guarded_step(eng, *args, **kwargs):
            self.skip = any_rank(self.nonfinite_local)
            old = set_lr_scale(0.0) if self.skip else None
            try:
                return step(eng, *args, **kwargs)
            finally:
                if old is not None:
                    restore_lr(old)

        # The engine dispatches through the class-level map with MethodType(fn, self): a per-instance
        # copy with one entry replaced changes this engine only.
        engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP, schedule.OptimizerStep: guarded_step}

    def guarded_loss(self, logits: torch.Tensor, labels) -> torch.Tensor:
        loss = self.loss_fn(logits, labels)
        if self.poison:
            loss = loss * float("nan")
        if not bool(torch.isfinite(loss.detach()).all().item()):
            self.nonfinite_local = True
            return logits.float().nan_to_num(0.0, 0.0, 0.0).sum() * 0.0
        return loss

    def begin(self, poison: bool) -> None:
        self.poison, self.nonfinite_local, self.skip = poison, False, False
        self.engine.module.loss_fn = self.guarded_loss

    def end(self) -> bool:
        """Restore the plain loss (evaluation uses it) and return whether the step was skipped."""
        self.engine.module.loss_fn = self.loss_fn
        return self.skip
