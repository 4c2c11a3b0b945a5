"""Exponential moving average of the trained weights (distillation evaluates the EMA student).

shadow <- decay * shadow + (1 - decay) * weight, after every optimizer step, in float32 whatever the
weights' dtype (a bf16 shadow would round away updates of relative size < 2^-8, i.e. all of them at
decay 0.999).

ZeRO-3: each rank holds only its partition of every parameter (``p.ds_tensor``; ``p.data`` is an
empty placeholder outside a gather). The shadow is built from that partition, so it is sharded like
the weights and costs 4 bytes x (local partition) per rank. A ZeRO-3 EMA state therefore only loads
at the same data-parallel size (as the ZeRO-3 checkpoint itself). Without ZeRO-3, ``p.data``.

ZeRO-3 and :meth:`EMA.swap_in`: writing the partitions is not enough, because DeepSpeed's parameter
coordinator keeps gathered/prefetched copies between forwards (measured: a forward right after the
swap still used the trained weights). Pass ``release_cache=engine.empty_partition_cache``; it is
called after swapping in and after restoring, so no gathered copy of the other weights survives.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Optional

import torch


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The part of ``p`` this rank owns: the ZeRO-3 partition if partitioned, else the whole tensor."""
    ds = getattr(p, "ds_tensor", None)
    return ds if ds is not None else p.data


class EMA:
    """A float32 shadow of ``params`` (their local partitions under ZeRO-3)."""

    def __init__(self, params: Iterable[torch.Tensor], decay: float,
                 release_cache: Optional[Callable[[], None]] = None):
        """params: the model's parameters (frozen ones are skipped); decay in [0, 1);
        release_cache: under ZeRO-3, ``engine.empty_partition_cache`` (see the module docstring)."""
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay} (config 'train.ema_decay').")
        self.decay = float(decay)
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("EMA got no trainable parameters.")
        self.shadow = [local_tensor(p).detach().float().clone() for p in self.params]
        self.num_updates = 0
        self.release_cache = release_cache
        self.partitioned = any(getattr(p, "ds_tensor", None) is not None for p in self.params)

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in; call once after each optimizer step."""
        for s, p in zip(self.shadow, self.params):
            s.lerp_(local_tensor(p).float(), 1.0 - self.decay)  # s + (1-d)(w - s) = d s + (1-d) w
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; shapes must match the local partitions exactly."""
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow):
            raise ValueError(f"EMA state has {len(shadow)} tensors, this model {len(self.shadow)} trainable "
                             f"parameters (a different model, or frozen/unfrozen parameters changed).")
        for i, (mine, theirs) in enumerate(zip(self.shadow, shadow)):
            if mine.shape != theirs.shape:
                raise ValueError(f"EMA tensor {i}: saved shape {tuple(theirs.shape)} != local {tuple(mine.shape)}"
                                 f" (under ZeRO-3 the EMA is sharded: resume at the same data-parallel size).")
        for mine, theirs in zip(self.shadow, shadow):
            mine.copy_(theirs)
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])

    @contextlib.contextmanager
    def swap_in(self) -> Iterator[None]:
        """Evaluate with the EMA weights: copy them into the model, restore the trained ones on exit.

        Only the model weights are swapped; optimizer master copies (bf16 / ZeRO) are untouched, so the
        restore on exit (also on exceptions) must happen before the next optimizer step.
        """
        if self.partitioned and self.release_cache is None:
            raise RuntimeError("EMA.swap_in on ZeRO-3 partitioned parameters needs "
                               "EMA(..., release_cache=engine.empty_partition_cache): otherwise DeepSpeed's "
                               "cached gathered weights make evaluation silently use the trained weights.")
        release = self.release_cache or (lambda: None)
        backup = [local_tensor(p).detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for s, p in zip(self.shadow, self.params):
                    local_tensor(p).copy_(s)
            release()
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    local_tensor(p).copy_(b)
            release()
