"""Every collective of ours goes through this module, with its tensors on the backend's device.

Why one module: gloo (CPU) accepts tensors on the host; NCCL accepts only CUDA tensors of the current
device. A collective written elsewhere with a CPU tensor passes every CPU test and fails on the first GPU
step. Here each call moves its tensor to :func:`comm_device` of the group's backend first and returns the
result on the caller's device, so the rule holds by construction. ``tests/test_device_rule.py`` fails
when a module outside this one calls ``torch.distributed`` collectives directly.

Host reads (``.item()``, ``bool(tensor)``) are syncs on a GPU: functions that return Python values say so
in their names' docstrings; the ``*_tensor`` forms keep the result on the device for callers that defer
the read (one sync per optimizer step, see mcd_scale/training/engine.py).

A call without an initialised process group is the single-process identity (world size 1).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if initialized() else 0


def comm_device(group=None) -> torch.device:
    """The device a collective's tensors must live on for this group's backend."""
    if initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _op(op: str):
    return getattr(dist.ReduceOp, _OPS[op])


def all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Reduce ``t`` over ``group``; returns a new tensor on ``t``'s device (``t`` is not modified)."""
    if not initialized():
        return t.clone()
    dev = comm_device(group)
    buf = t.detach().to(dev, copy=True)
    dist.all_reduce(buf, op=_op(op), group=group)
    return buf.to(t.device)


def all_reduce_(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place :func:`all_reduce` (no copy when ``t`` already lives on the backend's device); returns ``t``."""
    if not initialized():
        return t
    if t.device == comm_device(group) and t.is_contiguous():
        dist.all_reduce(t, op=_op(op), group=group)
        return t
    return t.copy_(all_reduce(t, op, group))


def any_rank_tensor(flag: torch.Tensor, group=None) -> torch.Tensor:
    """1.0 on every rank if ``flag`` is non-zero on any rank (float64 scalar, no host read)."""
    return all_reduce(flag.detach().to(torch.float64).reshape(1), "max", group)


def any_rank(flag: bool | torch.Tensor, group=None) -> bool:
    """True on every rank if ``flag`` is true on any rank (one collective and one host read)."""
    if not torch.is_tensor(flag):
        flag = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=comm_device(group))
    return bool(any_rank_tensor(flag, group).item() > 0)


def mean_tensor(value: torch.Tensor, group=None) -> torch.Tensor:
    """Mean of a scalar over ``group`` as a float64 tensor (no host read)."""
    v = all_reduce(value.detach().to(torch.float64).reshape(1), "sum", group)
    return v / world_size(group)


def mean(value: torch.Tensor, group=None) -> float:
    """Mean of a scalar over ``group`` (one collective and one host read)."""
    return float(mean_tensor(value, group).item())


def barrier(group=None) -> None:
    if initialized():
        dist.barrier(group=group)


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape on all ranks), in group rank order, on ``t``'s device."""
    if not initialized() or world_size(group) == 1:
        return [t]
    dev = comm_device(group)
    local = t.detach().contiguous().to(dev) if not t.requires_grad else t.contiguous().to(dev)
    parts = [torch.empty_like(local) for _ in range(world_size(group))]
    dist.all_gather(parts, local, group=group)
    return [p.to(t.device) for p in parts]


def all_gather_object(obj: Any, group=None) -> list:
    if not initialized():
        return [obj]
    out: list = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int, group=None) -> Any:
    """``obj`` of global rank ``src`` on every rank of ``group``."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=comm_device(group))
    return box[0]


def send_object(obj: Any, dst: int) -> None:
    dist.send_object_list([obj], dst=dst, device=comm_device())


def recv_object(src: int) -> Any:
    box = [None]
    dist.recv_object_list(box, src=src, device=comm_device())
    return box[0]


def send(t: torch.Tensor, dst: int) -> None:
    dist.send(t.detach().contiguous().to(comm_device()), dst=dst)


def recv(shape, dtype: torch.dtype, src: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Receive a tensor of ``shape``/``dtype`` from ``src``; returned on ``device`` (default: the host)."""
    buf = torch.empty(shape, dtype=dtype, device=comm_device())
    dist.recv(buf, src=src)
    return buf.to(device or torch.device("cpu"))
