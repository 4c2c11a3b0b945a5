"""Keyed random generators: every reproducible draw comes from (purpose, ids..., seed).

Never use the global RNG for anything a shard, a test or a checkpoint must reproduce: the global
stream depends on how many draws happened before (rank count, worker count, resume point). A
generator keyed by a hash of (purpose, seed, global sample id, ...) gives the same numbers for the
same sample whatever process computes it.
"""
from __future__ import annotations

import hashlib

import torch


def key_to_seed(purpose: str, *ids: int) -> int:
    """A 63-bit seed from a purpose string and integer ids (stable across Python runs/platforms)."""
    text = purpose + ":" + ",".join(str(int(i)) for i in ids)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_generator(purpose: str, *ids: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh torch.Generator seeded by (purpose, *ids). Typical ids: (seed, global_sample_id, step)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(key_to_seed(purpose, *ids))
    return gen


def keyed_uniform(purpose: str, ids: tuple[int, ...], shape, dtype=torch.float64) -> torch.Tensor:
    """Uniform(0,1) numbers from the keyed generator (float64 by default)."""
    return torch.rand(shape, generator=keyed_generator(purpose, *ids), dtype=dtype)
