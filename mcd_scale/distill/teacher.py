"""The frozen teacher of a distillation round (online mode and the SDTT baseline).

Three failure modes seen in public distillation code, and how this class rules them out:

1. Teacher left in train mode: dropout stays on and the targets are noisy. The module is put in
   eval mode once here, and every call checks no submodule was switched back (it raises).
2. Teacher registered as a submodule of the trainable model: it is then handed to the optimizer,
   partitioned by ZeRO-3 with the student, saved in the student's checkpoints, and switched to train
   mode by ``model.train()``. ``FrozenTeacher`` is deliberately *not* an ``nn.Module``: storing it as
   an attribute of a module registers nothing, so ``parameters()`` / ``state_dict()`` / ``train()`` of
   the owner never reach it. Its parameters also have ``requires_grad=False``.
3. Teacher re-copied on every micro-batch of a round-boundary step (or every step): wasted
   all-gathers under ZeRO-3 and, with gradient accumulation, micro-batches of one step seeing
   different teachers. :meth:`refresh_from` takes the round number and copies only when it increases.

Forward runs under ``torch.no_grad()`` rather than ``torch.inference_mode()``: the targets feed a loss
that autograd records (for the student), and inference-mode tensors may not be saved for backward.
The teacher holds a full (not ZeRO-partitioned) replica of the same tensor-parallel shard as the
student; under ZeRO-3 the student's partitions are gathered once per refresh.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Mapping, Optional

import torch
from torch import nn

ForwardFn = Callable[[nn.Module, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _default_forward(module: nn.Module, z: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
    return module(z, t)


def _strip_wrapper(name: str) -> str:
    """'module.x.y' -> 'x.y': DeepSpeedEngine / DDP wrap the model as ``.module``."""
    return name[len("module."):] if name.startswith("module.") else name


class FrozenTeacher:
    """A frozen, eval-mode, no-grad wrapper around a denoiser; callable as ``teacher(z, t) -> logits``."""

    def __init__(self, module: nn.Module, forward: ForwardFn = _default_forward, round: Optional[int] = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"FrozenTeacher needs an nn.Module, got {type(module).__name__}.")
        self._module = module
        self._forward = forward
        self._round = round
        self.refreshes = 0
        self._freeze()

    @classmethod
    def clone_of(cls, student: nn.Module, round: int = 0, forward: ForwardFn = _default_forward) -> "FrozenTeacher":
        """A teacher that is a deep copy of an unpartitioned student (single process / ZeRO <= 2).

        Under ZeRO-3 build a fresh model with the model factory and call :meth:`refresh_from` instead:
        a deep copy of a partitioned module copies empty placeholders.
        """
        return cls(copy.deepcopy(student), forward, round)

    def _freeze(self) -> None:
        self._module.eval()
        self._module.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The wrapped module (for inspection and moving; do not hand it to an optimizer)."""
        return self._module

    @property
    def round(self) -> Optional[int]:
        """The round whose teacher this is (None when loaded without one)."""
        return self._round

    def to(self, *args, **kwargs) -> "FrozenTeacher":
        self._module.to(*args, **kwargs)
        return self

    def __call__(self, z: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher logits for noisy ids z (and times t), without autograd history."""
        training = [name or "<root>" for name, m in self._module.named_modules() if m.training]
        if training:
            raise RuntimeError(f"the frozen teacher has modules in train mode ({', '.join(training[:3])}...): "
                               f"dropout would make its targets noisy. Something called .train() on it; "
                               f"never register the teacher inside a trainable module.")
        with torch.no_grad():
            return self._forward(self._module, z, t)

    def load_state(self, state_dict: Mapping[str, torch.Tensor], round: Optional[int] = None) -> None:
        """Load teacher weights (strict: every key must match), e.g. from a consolidated checkpoint."""
        clean = {_strip_wrapper(k): v for k, v in state_dict.items()}
        self._module.load_state_dict(clean, strict=True)
        self._freeze()
        self._round = round

    def refresh_from(self, student: nn.Module, round: int) -> bool:
        """At the start of ``round``, make the teacher a copy of the current student weights.

        Copies only if ``round`` is newer than the teacher's: a second call for the same round (another
        micro-batch of the boundary step, a resumed job) is a no-op returning False. An older round
        raises. Under ZeRO-3 the student's partitions are all-gathered once, read-only.
        """
        if self._round is not None and round < self._round:
            raise ValueError(f"refresh_from(round={round}) but the teacher is already from round {self._round}.")
        if self._round == round:
            return False
        src = {_strip_wrapper(n): p for n, p in student.named_parameters()}
        dst = dict(self._module.named_parameters())
        missing = sorted(set(dst) - set(src))
        if missing:
            raise ValueError(f"student lacks teacher parameters {missing[:5]}: not the same architecture.")
        gather: contextlib.AbstractContextManager = contextlib.nullcontext()
        if any(hasattr(p, "ds_tensor") for p in src.values()):
            import deepspeed  # only needed (and imported) for ZeRO-3 partitioned students

            gather = deepspeed.zero.GatheredParameters([src[n] for n in dst], modifier_rank=None)
        with gather, torch.no_grad():
            for name, p in dst.items():
                if p.shape != src[name].shape:
                    raise ValueError(f"parameter {name}: teacher {tuple(p.shape)} vs student "
                                     f"{tuple(src[name].shape)} (tensor-parallel layouts must match).")
                p.copy_(src[name])
            src_buffers = {_strip_wrapper(n): b for n, b in student.named_buffers()}
            for name, b in self._module.named_buffers():
                if name in src_buffers and src_buffers[name].shape == b.shape:
                    b.copy_(src_buffers[name])
        self._freeze()
        self._round = round
        self.refreshes += 1
        return True
