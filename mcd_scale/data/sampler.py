"""The global-batch sampler: an endless, deterministic, resumable stream of global sample ids.

Position ``p`` of the stream (``p = step * global_batch + j``, ``j`` the position inside the global
batch) holds sample ``order_e[p % N]`` of epoch ``e = p // N``. The order of an epoch is built so
that it can be read from tar shards without a global index or a global shuffle:

- the ids are cut into *blocks* of ``block`` consecutive ids (a block is a contiguous byte range of
  one shard when ``block`` divides the shard size, as with the default 1024 samples per shard;
  otherwise a block may span the end of one shard and the start of the next);
- the blocks are permuted (``keyed_generator("block-perm", seed, e)``) and grouped in *stripes* of
  ``stripe`` blocks in that order;
- within a stripe the samples are permuted (``keyed_generator("stripe-perm", seed, e, c)``): a
  bounded shuffle buffer of ``block * stripe`` samples.

Only the block permutation (``N / block`` integers) is held per epoch, and one stripe permutation
per stripe in use. A rank reads its part of a stripe as forward reads inside ``stripe`` byte ranges.
The trade-off against the old global shuffle (``randperm(N)``): a global batch draws from the
``stripe`` blocks of its stripe, not from the whole corpus, so neighbouring sequences of a document
are more likely to share a batch (``block`` small and ``stripe`` large keep this low); in exchange,
nothing at start-up or in memory grows with N. Hence:

- every sample exactly once per epoch, reshuffled each epoch; global batches straddle epoch
  boundaries, so nothing is dropped and every step has a full batch;
- the global batch of a step depends on (seed, N, global_batch, block, stripe, step) only, never on
  the parallel layout: any TP x PP x DP split trains on the same data at every step;
- the cursor is one integer (``consumed_samples``): resuming at step k replays nothing and skips
  nothing.

Each data-parallel rank takes a contiguous block of ``global_batch / dp`` positions, cut into
micro-batches in gradient-accumulation order. The position ``j`` travels with each sample because
losses stratify per-sample draws (antithetic diffusion times) over the global batch.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from mcd_scale.errors import InputError
from mcd_scale.rng import keyed_generator


class SamplerError(InputError):
    """Inconsistent batch sizes or a cursor that does not belong to this data."""


DEFAULT_BLOCK = 64
"""Ids per block: a block is one contiguous byte range of one shard when it divides the shard size."""
DEFAULT_STRIPE = 64
"""Blocks per stripe: the shuffle buffer is block x stripe = 4096 samples."""


class GlobalBatchSampler:
    """Deterministic endless global batches over ``num_samples`` ids (see the module docstring).

    ``shuffle=False`` streams ids in order (0, 1, ..., N-1, 0, ...): the fixed evaluation order.
    """

    ORDER = "block-stripe-v1"  # recorded in the cursor: a cursor of another order is refused

    def __init__(self, num_samples: int, global_batch: int, seed: int, shuffle: bool = True,
                 block: int = DEFAULT_BLOCK, stripe: int = DEFAULT_STRIPE) -> None:
        if num_samples < 1:
            raise SamplerError(f"num_samples must be >= 1, got {num_samples} (empty split?)")
        if global_batch < 1:
            raise SamplerError(f"global_batch must be >= 1, got {global_batch}")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch)
        self.seed = int(seed)
        self.shuffle = shuffle
        if block < 1 or stripe < 1:
            raise SamplerError(f"block and stripe must be >= 1, got {block}, {stripe}")
        self.block, self.stripe = int(block), int(stripe)
        self.consumed_samples = 0
        self._num_blocks = -(-self.num_samples // self.block)
        # Small per-instance caches: a step touches at most two epochs (a straddling batch) and a
        # few stripes.
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._stripes: dict[tuple[int, int], np.ndarray] = {}

    # -- the stream ------------------------------------------------------------------------------
    def _block_len(self, blocks: np.ndarray) -> np.ndarray:
        return np.minimum(self.block, self.num_samples - blocks * self.block)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(block order, stream offset where each block slot starts [num_blocks + 1])."""
        got = self._epochs.get(epoch)
        if got is None:
            order = torch.randperm(self._num_blocks, generator=keyed_generator("block-perm", self.seed, epoch)).numpy()
            starts = np.zeros(self._num_blocks + 1, dtype=np.int64)
            np.cumsum(self._block_len(order), out=starts[1:])
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            got = self._epochs[epoch] = (order, starts)
        return got

    def _stripe_perm(self, epoch: int, stripe: int, size: int) -> np.ndarray:
        perm = self._stripes.get((epoch, stripe))
        if perm is None:
            perm = torch.randperm(size, generator=keyed_generator("stripe-perm", self.seed, epoch, stripe)).numpy()
            if len(self._stripes) >= 8:
                self._stripes.pop(next(iter(self._stripes)))
            self._stripes[(epoch, stripe)] = perm
        return perm

    def _epoch_ids(self, epoch: int, offset: int, count: int) -> np.ndarray:
        """Ids at offsets ``offset .. offset+count-1`` of epoch ``epoch``'s order."""
        if not self.shuffle:
            return np.arange(offset, offset + count, dtype=np.int64)
        order, starts = self._epoch(epoch)
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            pos = offset + done
            slot = int(np.searchsorted(starts, pos, side="right")) - 1
            c = slot // self.stripe
            lo_slot, hi_slot = c * self.stripe, min((c + 1) * self.stripe, self._num_blocks)
            lo, hi = int(starts[lo_slot]), int(starts[hi_slot])
            take = min(count - done, hi - pos)
            # Stripe position -> (block slot, offset in block) -> id.
            local = self._stripe_perm(epoch, c, hi - lo)[pos - lo:pos - lo + take] + lo
            slots = np.searchsorted(starts, local, side="right") - 1
            out[done:done + take] = order[slots] * self.block + (local - starts[slots])
            done += take
        return out

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        """The whole order of epoch ``epoch`` (int64 tensor of all ids; O(N): tests and tools)."""
        return torch.from_numpy(self._epoch_ids(epoch, 0, self.num_samples))

    def ids_at(self, start: int, count: int) -> list[int]:
        """Sample ids at stream positions ``start .. start+count-1``."""
        out: list[int] = []
        pos, end = start, start + count
        while pos < end:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(end - pos, self.num_samples - offset)
            out.extend(self._epoch_ids(epoch, offset, take).tolist())
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
                "shuffle": self.shuffle, "order": self.ORDER, "block": self.block, "stripe": self.stripe}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the cursor; refuses a cursor taken over other data, seed or batch size (it would
        silently replay or skip samples)."""
        for key, mine in (("seed", self.seed), ("num_samples", self.num_samples),
                          ("global_batch", self.global_batch_size), ("shuffle", self.shuffle),
                          ("block", self.block), ("stripe", self.stripe)):
            if key in state and state[key] != mine:
                raise SamplerError(f"checkpointed data cursor has {key}={state[key]!r} but this run has {mine!r}; "
                                   "resume with the same data, seed and global_batch (or start a new run)")
        # A cursor without "order" was taken over the old global shuffle: the same position holds other
        # samples here, so resuming it would replay some and skip others.
        order = state.get("order", "global-perm-v0")
        if self.shuffle and order != self.ORDER:
            raise SamplerError(f"checkpointed data cursor is over the sample order {order!r} but this code reads "
                               f"{self.ORDER!r}; resume with the code that wrote the checkpoint (or start a new run)")
        consumed = int(state["consumed_samples"])
        if consumed % self.global_batch_size:
            raise SamplerError(f"consumed_samples {consumed} is not a multiple of global_batch {self.global_batch_size}")
        self.consumed_samples = consumed
