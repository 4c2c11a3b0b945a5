"""DeepSpeed's own checkpoint files (``*_model_states.pt``, ``*_optim_states.pt``, pipeline ``layer_*`` files) loaded
with ``torch.load(weights_only=True)`` and an explicit allowlist, instead of DeepSpeed's ``weights_only=False``.

The integrity record (:mod:`mcd_scale.checkpoint.integrity`) already refuses a file whose bytes differ from what
was written; this closes the rest: a checkpoint directory copied from elsewhere with a matching record, or a
record forged with its files, can no longer run code when DeepSpeed unpickles it. Only tensors, containers,
primitive values and the classes below are rebuilt; anything else is refused with the file named.

The allowlist is what the layouts we write hold (ZeRO-0/1/3, fp32 and bf16, the pipeline menu; checked by
tests/test_checkpoint_safe_load.py on files the trainer writes): DeepSpeed's ZeRO stage enum and loss-scaler
objects (bf16/fp32 runs keep a static scaler of 1), and the bf16 optimizer's ``fragment_address`` (ZeRO-1 bf16).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch


def allowed_globals() -> list:
    """The non-tensor classes DeepSpeed pickles into the checkpoints of our layouts (imported lazily)."""
    # lazy: loads deepspeed; importing this module does not need it
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


class UnsafeCheckpointFile(ValueError):
    """A DeepSpeed file holds something outside the allowlist (the message names the file and what)."""


def safe_load(path: str, map_location: Optional[Any] = None) -> Any:
    """``torch.load(path, weights_only=True)`` with :func:`allowed_globals`; :class:`UnsafeCheckpointFile` naming
    the file when it needs anything else."""
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            if type(exc).__name__ == "UnpicklingError" or "weights_only" in str(exc):
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UnsafeCheckpointFile(
                    f"{path}: refused to unpickle ({first}); a checkpoint we wrote holds only tensors and "
                    f"{', '.join(c.__name__ for c in allowed_globals())}: the file was not written by this "
                    f"project's trainer (resume from a checkpoint you wrote, or re-export it)") from None
            raise


def use_safe_loader(ds_engine) -> Callable:
    """Route every DeepSpeed load of ``ds_engine`` (model, optimizer, pipeline layer files) through
    :func:`safe_load`. Returns the loader it installed."""
    ckpt_engine = getattr(ds_engine, "checkpoint_engine", None)
    if ckpt_engine is None:
        raise RuntimeError("the DeepSpeed engine has no checkpoint_engine to load through")

    def load(path: str, map_location=None):
        return safe_load(os.fspath(path), map_location=map_location)

    ckpt_engine.load = load
    return load
