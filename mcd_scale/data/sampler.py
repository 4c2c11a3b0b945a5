"""The global-batch sampler: an endless, deterministic, resumable stream of global sample ids.

Position ``p`` of the stream (``p = step * global_batch + j``, ``j`` the position inside the global
batch) holds sample ``perm_e[p % N]`` with ``e = p // N`` and ``perm_e`` a permutation drawn from
``keyed_generator("epoch-perm", seed, e)``. Hence:

- every sample exactly once per epoch, reshuffled each epoch; global batches straddle epoch
  boundaries, so nothing is dropped and every step has a full batch;
- the global batch of a step depends on (seed, N, global_batch, step) only, never on the parallel
  layout: any TP x PP x DP split trains on the same data at every step;
- the cursor is one integer (``consumed_samples``): resuming at step k replays nothing and skips
  nothing.

Each data-parallel rank takes a contiguous block of ``global_batch / dp`` positions, cut into
micro-batches in gradient-accumulation order. The position ``j`` travels with each sample because
losses stratify per-sample draws (antithetic diffusion times) over the global batch.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from mcd_scale.rng import keyed_generator


class SamplerError(ValueError):
    """Inconsistent batch sizes or a cursor that does not belong to this data."""


class GlobalBatchSampler:
    """Deterministic endless global batches over ``num_samples`` ids (see the module docstring).

    ``shuffle=False`` streams ids in order (0, 1, ..., N-1, 0, ...): the fixed evaluation order.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise SamplerError(f"num_samples must be >= 1, got {num_samples} (empty split?)")
        if global_batch < 1:
            raise SamplerError(f"global_batch must be >= 1, got {global_batch}")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.consumed_samples = 0
        # A tiny per-instance cache: a step touches at most two epochs (a straddling batch).
        self._perms: dict[int, torch.Tensor] = {}

    # -- the stream ------------------------------------------------------------------------------
    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        """The order of epoch ``epoch`` (int64 tensor of all ids)."""
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                perm = torch.randperm(self.num_samples, generator=keyed_generator("epoch-perm", self.seed, epoch))
            else:
                perm = torch.arange(self.num_samples)
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def ids_at(self, start: int, count: int) -> list[int]:
        """Sample ids at stream positions ``start .. start+count-1``."""
        out: list[int] = []
        pos, end = start, start + count
        while pos < end:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(end - pos, self.num_samples - offset)
            out.extend(self.epoch_permutation(epoch)[offset:offset + take].tolist())
            pos += take
        return out

    def global_batch(self, step: int) -> list[int]:
        """The ``global_batch`` sample ids of optimizer step ``step`` (0-based), in position order."""
        return self.ids_at(step * self.global_batch_size, self.global_batch_size)

    def grad_accum(self, dp: int, micro_batch: int) -> int:
        """Micro-batches per rank per step; raises if global_batch != micro_batch x accum x dp."""
        per_rank, rem = divmod(self.global_batch_size, dp * micro_batch)
        if rem or per_rank < 1:
            raise SamplerError(f"global_batch {self.global_batch_size} is not a multiple of micro_batch "
                               f"{micro_batch} x dp {dp}; fix parallel.global_batch / parallel.micro_batch")
        return per_rank

    def rank_positions(self, step: int, dp_rank: int, dp: int, micro_batch: int) -> list[list[int]]:
        """Positions (0 .. global_batch-1) that rank ``dp_rank`` consumes at ``step``, one list per
        micro-batch in accumulation order. Independent of ``step``; given for symmetry."""
        accum = self.grad_accum(dp, micro_batch)
        if not 0 <= dp_rank < dp:
            raise SamplerError(f"dp_rank {dp_rank} outside [0, {dp})")
        base = dp_rank * accum * micro_batch
        return [list(range(base + m * micro_batch, base + (m + 1) * micro_batch)) for m in range(accum)]

    def rank_slice(self, step: int, dp_rank: int, dp: int, micro_batch: int) -> list[list[int]]:
        """Sample ids of this rank's micro-batches at ``step`` (the union over ranks is exactly
        ``global_batch(step)``)."""
        ids = self.global_batch(step)
        return [[ids[p] for p in mb] for mb in self.rank_positions(step, dp_rank, dp, micro_batch)]

    # -- cursor ----------------------------------------------------------------------------------
    @property
    def next_step(self) -> int:
        """The step whose batch comes next (``consumed_samples / global_batch``)."""
        return self.consumed_samples // self.global_batch_size

    def epoch_at(self, step: int) -> float:
        """Fractional epoch reached after ``step`` steps (for logs)."""
        return step * self.global_batch_size / self.num_samples

    def advance(self, steps: int = 1) -> None:
        """Mark ``steps`` more global batches consumed (the loader calls this per finished step)."""
        self.consumed_samples += steps * self.global_batch_size

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed,
                "num_samples": self.num_samples, "global_batch": self.global_batch_size,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the cursor; refuses a cursor taken over other data, seed or batch size (it would
        silently replay or skip samples)."""
        for key, mine in (("seed", self.seed), ("num_samples", self.num_samples),
                          ("global_batch", self.global_batch_size), ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                raise SamplerError(f"checkpointed data cursor has {key}={state[key]!r} but this run has {mine!r}; "
                                   "resume with the same data, seed and global_batch (or start a new run)")
        consumed = int(state["consumed_samples"])
        if consumed % self.global_batch_size:
            raise SamplerError(f"consumed_samples {consumed} is not a multiple of global_batch {self.global_batch_size}")
        self.consumed_samples = consumed
