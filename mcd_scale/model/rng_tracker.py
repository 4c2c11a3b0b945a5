"""CPU-safe dropout RNG streams for tensor parallelism, and activation checkpointing that replays them.

megatron-core's ``get_cuda_rng_tracker`` / ``model_parallel_cuda_manual_seed`` need CUDA, so the model
owns a small tracker of named generator states instead (no module-level singleton: each model holds
its own :class:`DropoutRNG`):

* ``'model-parallel-rng'`` -- differs across TP ranks. Dropout on a *TP-sharded* activation (attention
  probabilities, where each rank holds different heads) must draw independent masks per rank,
  otherwise every head shard would see the same mask pattern.
* ``'data-parallel-rng'`` -- identical on all TP ranks of one model replica. Dropout on a *replicated*
  activation (the residual stream after a row-parallel all-reduce) must draw the same mask on every
  TP rank, otherwise the replicas of the hidden state diverge silently.

:meth:`DropoutRNG.fork` swaps a named state into the device's default generator for the duration of
a ``with`` block and stores the advanced state back, so any torch op (``F.dropout``, SDPA's
``dropout_p``) draws from the named stream. Works on CPU and CUDA (the device's default generator).

Activation checkpointing recomputes the forward in backward; the named streams have advanced by
then, so :func:`checkpoint` snapshots them at forward time and restores the snapshot for the
recompute (the same thing megatron's ``CheckpointFunction`` does with its CUDA tracker).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
import torch.utils.checkpoint as torch_checkpoint

from mcd_scale.rng import key_to_seed

MODEL_PARALLEL_RNG = "model-parallel-rng"
DATA_PARALLEL_RNG = "data-parallel-rng"


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _get_state(device_type: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device_type == "cuda" else torch.get_rng_state()


def _set_state(device_type: str, state: torch.Tensor) -> None:
    if device_type == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class DropoutRNG:
    """Named dropout RNG streams (see module docstring). One instance per model replica."""

    def __init__(self, seed: int = 0, tp_rank: int = 0, dp_rank: int = 0, pp_rank: int = 0,
                 device_type: Optional[str] = None) -> None:
        self.device_type = device_type or _device_type()
        self._states: dict[str, torch.Tensor] = {}
        self.seed(seed, tp_rank=tp_rank, dp_rank=dp_rank, pp_rank=pp_rank)

    def seed(self, seed: int, tp_rank: int = 0, dp_rank: int = 0, pp_rank: int = 0) -> None:
        """(Re)seed both streams. Keys include dp/pp rank so replicas and stages draw independently;
        only the model-parallel stream includes the TP rank."""
        self._states = {
            DATA_PARALLEL_RNG: self._fresh_state(key_to_seed("dropout-shared", seed, pp_rank, dp_rank)),
            MODEL_PARALLEL_RNG: self._fresh_state(key_to_seed("dropout-tp", seed, pp_rank, dp_rank, tp_rank)),
        }

    def _fresh_state(self, seed: int) -> torch.Tensor:
        gen = torch.Generator(device=self.device_type)
        gen.manual_seed(seed)
        return gen.get_state()

    def get_states(self) -> dict[str, torch.Tensor]:
        """A copy of all named states (for checkpoints and activation recompute)."""
        return {k: v.clone() for k, v in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        missing = set(self._states) - set(states)
        if missing:
            raise KeyError(f"DropoutRNG.set_states: missing stream(s) {sorted(missing)}")
        self._states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block with the device's default generator set to stream ``name``."""
        if name not in self._states:
            raise KeyError(f"DropoutRNG has no stream {name!r}; known: {sorted(self._states)}")
        outer = _get_state(self.device_type)
        _set_state(self.device_type, self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_state(self.device_type)
            _set_state(self.device_type, outer)


def checkpoint(fn: Callable[..., Any], *args: Any, rng: Optional[DropoutRNG] = None) -> Any:
    """``torch.utils.checkpoint`` (non-reentrant) that also replays ``rng``'s named streams.

    The snapshot is taken when the forward runs; the recompute (inside backward, possibly after other
    micro-batches advanced the streams) runs with that snapshot and then restores the live streams.
    """
    if rng is None:
        return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)

    def contexts():
        snapshot = rng.get_states()

        @contextlib.contextmanager
        def replay() -> Iterator[None]:
            live = rng.get_states()
            rng.set_states(snapshot)
            try:
                yield
            finally:
                rng.set_states(live)

        return contextlib.nullcontext(), replay()

    return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True,
                                       context_fn=contexts)
