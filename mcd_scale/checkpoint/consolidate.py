"""Logical tensors out of a live engine, one parameter at a time, streamed into a safetensors file.

:func:`iter_full` walks every logical parameter of the model in one global order that every rank agrees
on (rank order = stage order), gathers that one parameter to global rank 0 (TP shards concatenated, ZeRO-3
partitions gathered over the DP group, a later pipeline stage's tensor sent from its (tp 0, dp 0) rank) and
yields it there; other ranks get ``None``. :class:`StreamWriter` writes the safetensors header first
(names, dtypes and shapes are known before any data) and then each tensor as it arrives, so the peak
memory of a conversion is the engine's own shards plus one logical tensor on rank 0, never a whole model.

Used by ``tools/convert_ckpt.py consolidate`` / ``reshard`` (mcd_scale/checkpoint/worker.py).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterator, Optional

import torch

from mcd_scale.parallel import collectives
from mcd_scale.model.logical import logical_parameters

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32"}
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class StreamWriter:
    """A safetensors file written tensor by tensor in the order of ``entries`` ([(name, dtype, shape)]).
    Written to ``path + '.tmp.<pid>'`` and renamed by :meth:`close`, so a failed conversion never leaves a
    file under the final name."""

    def __init__(self, path: str, entries: list[tuple[str, torch.dtype, tuple]], metadata: Optional[dict] = None):
        header: dict = {}
        offset = 0
        for name, dtype, shape in entries:
            n = 1
            for d in shape:
                n *= int(d)
            size = n * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": [int(d) for d in shape],
                            "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.path, self.tmp = path, f"{path}.tmp.{os.getpid()}"
        self.expected = [(name, dtype, tuple(int(d) for d in shape)) for name, dtype, shape in entries]
        self.index = 0
        self.fh = open(self.tmp, "wb")
        self.fh.write(struct.pack("<Q", len(raw)))
        self.fh.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self.expected[self.index]
        if name != want_name or tuple(tensor.shape) != shape:
            raise RuntimeError(f"stream order: got {name} {tuple(tensor.shape)}, expected {want_name} {shape}")
        t = tensor.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1)
        self.fh.write(t.view(torch.uint8).numpy().data)  # the tensor's own bytes, no second copy
        self.index += 1

    def close(self) -> None:
        if self.index != len(self.expected):
            raise RuntimeError(f"{self.path}: {self.index} of {len(self.expected)} tensors written")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def global_parameters(module, dims) -> list[tuple[str, tuple, torch.dtype, int]]:
    """[(logical name, logical shape, dtype, owning pipeline stage)] of the whole model, identical on every
    rank (collective). A name on two stages (the tied embedding on the last one) belongs to the first."""
    mine = [(n, tuple(p.logical_shape), str(p.dtype).replace("torch.", ""), dims.pp_rank if dims else 0)
            for n, p in logical_parameters(module)]
    everyone = collectives.all_gather_object(mine) if dims is not None and dims.world_size > 1 else [mine]
    seen: dict[str, tuple] = {}
    for stage in sorted({e[3] for lst in everyone for e in lst}):
        for lst in everyone:
            for name, shape, dtype, st in lst:
                if st == stage and name not in seen:
                    seen[name] = (name, shape, getattr(torch, dtype), st)
    return list(seen.values())


def _gather_tp(local: torch.Tensor, split_dim: Optional[int], dims) -> torch.Tensor:
    if dims is None or dims.tp == 1 or split_dim is None:
        return local
    return torch.cat(collectives.all_gather(local, group=dims.tp_group), dim=split_dim)


@torch.no_grad()
def iter_full(module, dims, local_of: Callable, order: list) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """(name, full logical tensor on global rank 0 / None elsewhere) for each entry of ``order``
    (:func:`global_parameters`), one at a time. Collective: every rank iterates the whole order."""
    params = dict(logical_parameters(module))
    rank = 0 if dims is None else dims.rank
    my_stage = 0 if dims is None else dims.pp_rank
    for name, shape, _dtype, stage in order:
        full = None
        if stage == my_stage:
            p = params[name]
            full = _gather_tp(local_of(p), p.tp_split_dim, dims)
            if tuple(full.shape) != tuple(shape):
                raise RuntimeError(f"{name}: gathered shape {tuple(full.shape)} != logical {tuple(shape)}")
        if stage != 0:
            src = dims.rank_of(stage, 0, 0)
            if rank == src:
                collectives.send_object(str(full.dtype).replace("torch.", ""), dst=0)
                collectives.send(full.contiguous(), dst=0)
            elif rank == 0:
                dtype = getattr(torch, collectives.recv_object(src))
                full = collectives.recv(tuple(shape), dtype, src, device=torch.device("cpu"))
        yield name, (full.cpu() if (rank == 0 and full is not None) else None)
        del full
