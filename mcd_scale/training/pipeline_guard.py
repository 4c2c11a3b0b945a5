"""The non-finite policy (loss and gradient) for DeepSpeed's pipeline engine (the PP menu).

The plain engine checks each micro-batch's loss before its backward and each gradient in a hook
(mcd_scale/training/engine.py, mcd_scale/training/grad_guard.py). The pipeline engine runs forward, backward and the optimizer step
inside one ``train_batch`` schedule, and only the last stage ever sees a loss, so the same policy needs two hooks
(plus the gradient guard, which works unchanged on a stage's parameters: its tensor hooks run on each micro-batch's
local gradient before DeepSpeed accumulates it, reduces tied weights across stages or over data parallelism):

1. the last stage's loss function is wrapped: a non-finite loss (or a poisoned one, for fault
   injection) is recorded and replaced by a zero that is connected to the graph through finite values
   only, so the backward sends zero gradients up the pipeline instead of NaNs;
2. the schedule's ``OptimizerStep`` instruction is wrapped, on this engine instance only: every rank
   reaches it after its last send/receive of the batch, all ranks agree (one all-reduce over the world,
   the step's only collective of ours) whether any last stage saw a bad loss or any stage of any data-parallel
   replica a non-finite gradient (zeroed where it arose), and if so the step runs with the learning rate scaled
   to 0 — exactly what the plain engine does, so a skipped step leaves PP and DP runs in the same state
   (tests/test_train_teacher.py::test_pp2_skips_a_nonfinite_step_like_pp1).
"""
from __future__ import annotations

from typing import Callable

import torch

from mcd_scale.parallel import collectives


class PipelineNonFiniteGuard:
    """Install on a PipelineEngine; call :meth:`begin` before and :meth:`end` after ``train_batch``.

    One collective and one host read per step (at the ``OptimizerStep`` instruction): the last stage keeps its
    bad-micro-batch count and loss sum on the device (no read per micro-batch), and the world agrees on
    [bad count, loss sum, losses, stop requested, bad input] once."""

    def __init__(self, engine, loss_fn: Callable, device, set_lr_scale: Callable[[float], list],
                 restore_lr: Callable[[list], None], grad_guard=None):
        from deepspeed.runtime.pipe import schedule

        self.engine, self.loss_fn, self.device, self.grad_guard = engine, loss_fn, device, grad_guard
        self.poison, self.stop_requested, self.bad_input = False, False, None
        self._reset()
        step = type(engine)._INSTRUCTION_MAP[schedule.OptimizerStep]

        def guarded_step(eng, *args, **kwargs):
            n_bad = self.n_bad if grad_guard is None else self.n_bad + grad_guard.bad.double()
            summary = torch.stack([n_bad, self.loss_sum, self.n_losses,
                                   torch.full_like(self.n_bad, float(self.stop_requested)),
                                   torch.full_like(self.n_bad, float(self.bad_input is not None))])
            bad, loss_sum, n_losses, stop, bad_inputs = collectives.all_reduce(summary, "sum").tolist()
            if bad_inputs > 0:  # a rank read a bad sample: every rank stops here, before the update
                from mcd_scale.data.bad_input import stop_every_rank

                stop_every_rank(self.bad_input)
            self.skip, self.stop = bad > 0, stop > 0
            self.loss_mean = loss_sum / max(n_losses, 1.0)
            old = set_lr_scale(0.0) if self.skip else None
            try:
                return step(eng, *args, **kwargs)
            finally:
                if old is not None:
                    restore_lr(old)

        # The engine dispatches through the class-level map with MethodType(fn, self): a per-instance
        # copy with one entry replaced changes this engine only.
        engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP, schedule.OptimizerStep: guarded_step}

    def _reset(self) -> None:
        z = torch.zeros((), dtype=torch.float64, device=self.device)
        self.n_bad, self.loss_sum, self.n_losses = z, z.clone(), z.clone()
        self.skip, self.stop, self.loss_mean = False, False, float("nan")

    def guarded_loss(self, logits: torch.Tensor, labels) -> torch.Tensor:
        from mcd_scale.training.engine import guard_nonfinite, poisoned

        loss = self.loss_fn(logits, labels)
        if self.poison:
            loss = poisoned(loss)
        loss, ok = guard_nonfinite(loss, logits)
        self.n_bad = self.n_bad + (~ok).double()
        self.loss_sum = self.loss_sum + torch.where(ok, loss.detach().double(), torch.zeros_like(self.loss_sum))
        self.n_losses = self.n_losses + 1.0
        return loss

    def begin(self, poison: bool, stop_requested: bool = False, bad_input=None) -> None:
        self.poison, self.stop_requested, self.bad_input = poison, stop_requested, bad_input
        self._reset()
        if self.grad_guard is not None:
            self.grad_guard.reset()
        self.engine.module.loss_fn = self.guarded_loss

    def end(self) -> tuple[bool, float, bool]:
        """Restore the plain loss (evaluation uses it); (skipped, world-mean loss of the step, stop on any rank)."""
        self.engine.module.loss_fn = self.loss_fn
        return self.skip, self.loss_mean, self.stop
