"""Logical (layout-independent) parameter metadata.

Every parameter of the model carries three attributes, set where the parameter is created:

* ``logical_name``  -- a stable name independent of TP/PP, e.g. ``blocks.3.attn.qkv.weight`` (the
  parameter's name in the plain single-process :class:`DiffusionTransformer`);
* ``logical_shape`` -- the full (un-sharded) shape;
* ``tp_split_dim``  -- the dimension split contiguously across TP ranks, or None if replicated;
* ``init_kind``     -- how :func:`mcd_scale.model.init.init_weights` fills it
  ('normal', 'zeros', 'ones'); a 'normal' parameter may also carry ``init_std_scale`` (default 1),
  e.g. 1/sqrt(2 * layers) for the projections into the residual stream (GPT-2 scaled init).

Everything layout-independent (initialisation, full state dicts, checkpoint conversion) works on the
logical tensors and slices them with :func:`local_slice`; nothing depends on module paths.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from torch import nn

INIT_KINDS = ("normal", "zeros", "ones")


def set_logical(param: nn.Parameter, logical_shape: Sequence[int], tp_split_dim: Optional[int],
                init_kind: str) -> None:
    """Attach layout metadata to a parameter (its name is attached later by :func:`name_parameters`).

    TP-sharded parameters also get megatron's ``tensor_model_parallel`` attributes: DeepSpeed's
    gradient clipping counts the norm of parameters without them on TP rank 0 only, which would
    under-count sharded parameters.
    """
    if init_kind not in INIT_KINDS:
        raise ValueError(f"init_kind {init_kind!r} not in {INIT_KINDS}")
    param.logical_shape = tuple(int(s) for s in logical_shape)
    param.tp_split_dim = tp_split_dim
    param.init_kind = init_kind
    param.tensor_model_parallel = tp_split_dim is not None
    param.partition_dim = -1 if tp_split_dim is None else tp_split_dim
    param.partition_stride = 1


def name_parameters(module: nn.Module, prefix: str) -> None:
    """Set ``logical_name = prefix + local name`` on every parameter of ``module`` that has metadata.

    Called by the containers (the plain model with prefix '', each pipeline layer with its logical
    prefix such as 'blocks.3.'), so the same block has the same logical names in both forms.
    """
    for name, param in module.named_parameters():
        if not hasattr(param, "logical_shape"):
            raise RuntimeError(f"parameter {prefix}{name} has no logical metadata (set_logical was not "
                               f"called where it is created)")
        param.logical_name = prefix + name


def logical_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(logical_name, parameter) for each distinct parameter, in module order. A parameter shared by
    two modules (tied embeddings) is yielded once."""
    seen: set[int] = set()
    for param in module.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        name = getattr(param, "logical_name", None)
        if name is None:
            raise RuntimeError("a parameter has no logical_name; build the model through "
                               "DiffusionTransformer or build_pipeline_module")
        yield name, param


def local_shape(logical_shape: Sequence[int], tp_split_dim: Optional[int], tp_size: int) -> tuple[int, ...]:
    shape = list(logical_shape)
    if tp_split_dim is not None:
        if shape[tp_split_dim] % tp_size:
            raise ValueError(f"dimension {tp_split_dim} of {tuple(logical_shape)} not divisible by tp={tp_size}")
        shape[tp_split_dim] //= tp_size
    return tuple(shape)


def local_slice(full: torch.Tensor, tp_split_dim: Optional[int], tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's contiguous slice of a full logical tensor (the tensor itself if replicated)."""
    if tp_split_dim is None or tp_size == 1:
        return full
    return full.chunk(tp_size, dim=tp_split_dim)[tp_rank]
