"""The one non-finite policy of training: a step with a non-finite loss or gradient on any rank is skipped on every
rank (its optimizer step runs at learning rate 0), and too many in a row end the run with exit code 3 (the trainer
counts them). One part per place a non-finite value can arise:

- **The loss** (:func:`guard_nonfinite`): checked per micro-batch before its backward, on the device, and replaced
  by a graph-connected zero, so the micro-batch adds exactly zero to the gradients. :func:`poisoned` makes a NaN
  loss for fault injection.
- **The gradient** (:class:`GradFiniteGuard`): a backward can produce NaN/Inf from a finite loss (an overflowing
  matmul, a bad kernel, a bit flip on one device). The data-parallel reduction would spread it to every rank, and
  an optimizer step -- even at lr 0, since ``p - 0 * NaN`` is NaN -- would write NaN into the weights and Adam's
  moments. A tensor hook on every trainable parameter runs on this rank's local gradient before DeepSpeed
  accumulates, reduces or partitions it (tensor hooks precede the AccumulateGrad node that ZeRO hooks onto), so it
  works for ZeRO 0-3 alike: it records a device flag (no host read) and replaces a non-finite gradient by zeros.
- **The step**: the plain engine (mcd_scale/training/engine.py) adds both flags to the step's one collective. The
  pipeline engine runs forward, backward and the optimizer step inside one ``train_batch`` schedule and only the
  last stage sees a loss, so :class:`PipelineNonFiniteGuard` (the PP menu) wraps (1) the last stage's loss
  function with the loss guard and (2) the schedule's ``OptimizerStep`` instruction, on this engine instance only:
  every rank reaches it after its last send/receive of the batch, all ranks agree in one all-reduce whether any
  last stage saw a bad loss or any stage of any data-parallel replica a non-finite gradient, and if so the step
  runs at learning rate 0 -- exactly what the plain engine does, so a skipped step leaves PP and DP runs in the
  same state (tests/test_train_teacher.py::test_pp2_skips_a_nonfinite_step_like_pp1).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from mcd_scale.data.bad_input import stop_every_rank
from mcd_scale.parallel import collectives


def poisoned(loss: torch.Tensor) -> torch.Tensor:
    """Fault injection: a NaN loss whose backward creates no NaN of its own (an add passes the gradient
    through unchanged; a multiply by NaN would put NaN into every gradient, even a zero one)."""
    return loss + float("nan")


def guard_nonfinite(loss: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, finite flag as a device bool), with no host read.

    Where the loss is non-finite, the loss's own backward may produce NaN (0 x inf partials), so a hook on the
    logits replaces their gradient by zeros (``torch.where`` with a scalar zero, not a product: 0 x NaN is NaN),
    and the returned loss is a finite zero whose backward still reaches every parameter (through the loss's
    graph). The micro-batch then adds exactly zero to the gradients; the step-level decision (skip at lr 0) is
    taken once per step by the caller."""
    ok = torch.isfinite(loss.detach()).all()
    if logits.requires_grad:
        logits.register_hook(lambda g: torch.where(ok, g, 0.0))  # one pass; no zeros tensor of the logits' size
    # The backward still runs through the loss's graph (where's gradient to it is zero), so a constant zero is
    # enough; deriving it from the whole logits (nan_to_num + sum) cost two passes over them each way.
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return torch.where(ok, loss, zero), ok


class GradFiniteGuard:
    def __init__(self, params: Iterable[torch.nn.Parameter], device: torch.device):
        self.device = device
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.handles = [p.register_hook(self._hook) for p in params if p.requires_grad]

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        # One read for the check, one read/write for the replacement: the sum is non-finite iff some element is
        # (NaN and +-Inf propagate; inf - inf is NaN), or the finite gradient's sum overflows, itself a gradient
        # to skip. ``isfinite(grad).all()`` + ``where(ok, grad, zeros_like(grad))`` took ~6 passes over every
        # gradient (tools/bench/train_overhead.py profile, docs/performance.md).
        ok = torch.isfinite(grad.sum())
        self.bad = self.bad | ~ok.to(self.device)
        return torch.where(ok, grad, 0.0)

    def reset(self) -> None:
        self.bad = torch.zeros((), dtype=torch.bool, device=self.device)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class PipelineNonFiniteGuard:
    """Install on a PipelineEngine; call :meth:`begin` before and :meth:`end` after ``train_batch``.

    One collective and one host read per step (at the ``OptimizerStep`` instruction): the last stage keeps its
    bad-micro-batch count and loss sum on the device (no read per micro-batch), and the world agrees on
    [bad count, loss sum, losses, stop requested, bad input] once."""

    def __init__(self, engine, loss_fn: Callable, device, set_lr_scale: Callable[[float], list],
                 restore_lr: Callable[[list], None], grad_guard=None):
        # lazy: loads deepspeed; importing this module does not need it
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
