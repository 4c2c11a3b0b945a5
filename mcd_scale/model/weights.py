"""Layout-independent weights: full (logical) state dicts, sharding them into any layout, safetensors.

A full state dict maps ``logical_name -> full tensor`` (see :mod:`mcd_scale.model.transformer` for the
names). It is the same whatever TP/PP/ZeRO layout produced it, which is what lets a teacher trained at
TP=2 load at TP=1 or PP=2, and what the consolidated checkpoint (``model.safetensors``) stores.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

import torch
from torch import nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mcd_scale.parallel import collectives
from mcd_scale.model.logical import local_slice, logical_parameters


def _gathered(param: nn.Parameter, modify: bool):
    """ZeRO-3: make ``param.data`` the full local tensor (collective over the param's DP group)."""
    if hasattr(param, "ds_id"):
        # lazy: loads deepspeed; importing this module does not need it
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=0 if modify else None)
    return contextlib.nullcontext()


def _tp(dims) -> tuple[int, int, Optional[object]]:
    if dims is None or dims.tp == 1:
        return 0, 1, None
    return dims.tp_rank, dims.tp, dims.tp_group


def _gather_tp(local: torch.Tensor, split_dim: Optional[int], dims) -> torch.Tensor:
    tp_rank, tp_size, group = _tp(dims)
    if split_dim is None or tp_size == 1:
        return local
    return torch.cat(collectives.all_gather(local, group=group), dim=split_dim)


def local_weight(param: nn.Parameter) -> torch.Tensor:
    with _gathered(param, modify=False):
        return param.data.detach().clone()


def _stage_state(module: nn.Module, dims, local_of: Callable[[nn.Parameter], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full logical tensors of this stage's parameters (collective over the TP and ZeRO-3 DP groups)."""
    out: dict[str, torch.Tensor] = {}
    # Only the ranks whose copy is used keep one on the host: global rank 0, and under pipeline parallelism
    # each stage's sender (pp=s, dp=0, tp=0). Every other rank still takes part in the gathers but copies
    # nothing: a full 1B model is ~2-4 GB of host memory per rank otherwise (8 ranks per node).
    keep = dims is None or dims.rank == 0 or (dims.pp > 1 and dims.dp_rank == 0 and dims.tp_rank == 0)
    for name, param in logical_parameters(module):
        local = local_of(param)
        full = _gather_tp(local, param.tp_split_dim, dims)
        if tuple(full.shape) != tuple(param.logical_shape):
            raise RuntimeError(f"{name}: gathered shape {tuple(full.shape)} != logical {param.logical_shape}")
        if keep:
            out.setdefault(name, full.cpu())  # a tied copy on the same stage is the same tensor
        del local, full
    return out


@torch.no_grad()
def full_state_dict(module: nn.Module, dims=None,
                    local_of: Optional[Callable[[nn.Parameter], torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """``{logical_name: full tensor (CPU, param dtype)}`` of the whole model, on global rank 0.

    Collective: every rank must call it. TP shards are all-gathered, ZeRO-3 partitions gathered one
    parameter at a time, and with pipeline parallelism each stage's (tp 0, dp 0) rank sends its layers
    to global rank 0. Returns the complete dict on global rank 0 and ``{}`` on every other rank (so the
    result means the same at every layout). ``dims=None``: single process.

    ``local_of(param)`` gives this TP rank's whole (ZeRO-gathered) tensor for a parameter; the default is
    its weight. mcd_scale/checkpoint/universal.py passes the fp32 master weight and Adam's moments instead.
    """
    state = _stage_state(module, dims, local_of or local_weight)
    rank = 0 if dims is None else dims.rank
    if dims is None or dims.pp == 1:
        return state if rank == 0 else {}
    # Pipeline: stage s's representative (pp=s, dp=0, tp=0) ships its tensors to global rank 0.
    for stage in range(1, dims.pp):
        src = dims.rank_of(stage, 0, 0)
        if rank == src:
            collectives.send_object([(n, tuple(t.shape), t.dtype) for n, t in state.items()], dst=0)
            for tensor in state.values():
                collectives.send(tensor, dst=0)
        elif rank == 0:
            for name, shape, dtype in collectives.recv_object(src):
                buf = collectives.recv(shape, dtype, src)  # on the host: a full state dict is a host object
                state.setdefault(name, buf)  # the tied embedding copy on the last stage is a duplicate
    return state if rank == 0 else {}


def _all_logical_names(module: nn.Module, dims) -> set[str]:
    names = {n for n, _ in logical_parameters(module)}
    if dims is not None and dims.pp > 1:
        gathered = collectives.all_gather_object(sorted(names), group=dims.pp_group)
        names = set().union(*map(set, gathered))
    return names


@torch.no_grad()
def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor], dims=None) -> None:
    """Copy a full logical state into ``module``'s local shards (any TP/PP layout, ZeRO-3 aware).

    Strict: a name the model lacks, a name the state lacks, or a shape that differs from the logical
    shape raises ``KeyError``/``ValueError`` naming them, before anything is written. Every rank must
    pass the same ``state`` (each loads the file) and call it (collective under ZeRO-3 and PP).
    """
    params = list(logical_parameters(module))
    model_names = _all_logical_names(module, dims)
    missing = sorted({n for n, _ in params} - set(state))
    unexpected = sorted(set(state) - model_names)
    if missing or unexpected:
        raise KeyError(f"load_full_state_dict: missing from the state: {missing or 'none'}; "
                       f"not in the model: {unexpected or 'none'}")
    bad = [f"{n}: state {tuple(state[n].shape)} vs model {p.logical_shape}" for n, p in params
           if tuple(state[n].shape) != tuple(p.logical_shape)]
    if bad:
        raise ValueError("load_full_state_dict: shape mismatch: " + "; ".join(bad))
    tp_rank, tp_size, _ = _tp(dims)
    for name, param in params:
        local = local_slice(state[name], param.tp_split_dim, tp_rank, tp_size)
        with _gathered(param, modify=True):
            param.data.copy_(local.to(dtype=param.dtype, device=param.device))


def save_safetensors(state: dict[str, torch.Tensor], path: str, metadata: Optional[dict[str, str]] = None) -> None:
    """Write ``state`` as safetensors atomically (temp file in the same directory, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file (no pickle) into CPU tensors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file '{path}' does not exist")
    return load_file(path, device="cpu")


def safetensors_metadata(path: str) -> dict[str, str]:
    """The string metadata stored with :func:`save_safetensors`."""
    with safe_open(path, framework="pt") as fh:
        return dict(fh.metadata() or {})
