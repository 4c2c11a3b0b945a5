"""Disk plan of a run: bytes of one checkpoint tag and of one distillation round's trajectory shards.

Estimates from the file layouts (no model is built, nothing is read), printed by ``mcd_scale/train.py
--dry-run`` beside the memory plan and used by ``tools/precompute_trajectories.py --dry-run`` to refuse a
round the output file system cannot hold. The trajectory estimate follows the record layout of
:mod:`mcd_scale.data.trajectories` (ids, times, and per position masked at s: its index, k ids, k float16
log-probabilities and a float32 tail) inside the tar members of :mod:`mcd_scale.data.shards`; the number
of masked positions is its expectation over the round's (t, s) law (:func:`mcd_scale.distill.rounds.round_times`).
"""
from __future__ import annotations

import math
import os
import shutil

NPY_HEADER = 128  # np.save's header for these small shapes (format 1.0, padded to 64-byte multiples)
TAR_BLOCK = 512  # one ustar header per member, data padded to whole blocks
TAR_END = 2 * TAR_BLOCK  # the end-of-archive blocks of each shard


def round_samples(cfg) -> int:
    """Samples one distillation round reads: ``distill.steps_per_round x parallel.global_batch``."""
    return int(cfg.distill.steps_per_round) * int(cfg.parallel.global_batch)


def _index_bytes(limit: int) -> int:
    return 2 if limit <= 1 << 16 else 4  # mcd_scale/distill/targets.py _index_dtype


def _member(payload: float) -> float:
    """Tar bytes of one .npy member of ``payload`` data bytes of varying size (header block + data padded
    to blocks, the padding taken as half a block on average)."""
    return TAR_BLOCK + NPY_HEADER + payload + TAR_BLOCK / 2


def _fixed_member(payload: int) -> int:
    """Tar bytes of one .npy member of a fixed ``payload`` size."""
    return TAR_BLOCK + TAR_BLOCK * math.ceil((NPY_HEADER + payload) / TAR_BLOCK)


def masked_fraction_at_s(cfg, round_idx: int | None = None, points: int = 4096) -> float:
    """E[1 - alpha_s] over the round's pairs: the expected fraction of positions a record stores."""
    # lazy: loads torch; importing this module does not need it
    import torch

    from mcd_scale.diffusion.schedules import get_schedule
    from mcd_scale.distill.rounds import round_dt, round_times

    n = cfg.distill.round if round_idx is None else round_idx
    t_min = cfg.diffusion.t_min
    u = (torch.arange(points, dtype=torch.float64) + 0.5) / points  # midpoints of the uniform law of t (a host-side estimate, no model)
    _t, s = round_times(t_min + (1.0 - t_min) * u, round_dt(cfg.distill, n), t_min, cfg.distill.times)
    alpha = get_schedule(cfg.diffusion.schedule, cfg.diffusion.eps).alpha(s)
    return float((1.0 - alpha).mean())


def trajectory_sample_bytes(cfg, round_idx: int | None = None) -> int:
    """Expected bytes of one trajectory record on disk (tar members included)."""
    m, k = cfg.model, cfg.distill.top_k
    L = m.seq_len
    n = L * masked_fraction_at_s(cfg, round_idx)
    token_bytes = 2 if m.vocab_size < 1 << 16 else 4  # the token shards' uint16/uint32
    total = _fixed_member(L * token_bytes) + _fixed_member(16)  # ids, times (float64 [2])
    total += _member(n * _index_bytes(L))  # topk_pos
    total += _member(n * k * _index_bytes(m.vocab_size))  # topk_ids
    total += _member(n * k * 2)  # topk_logp float16
    total += _member(n * 4)  # tail_logp float32
    return int(total)


def trajectory_round_bytes(cfg, num_samples: int | None = None, samples_per_shard: int = 1024,
                           round_idx: int | None = None) -> int:
    """Bytes of one round's trajectory set of ``num_samples`` records (default: what the round reads)."""
    n = round_samples(cfg) if num_samples is None else int(num_samples)
    shards = max(1, -(-n // samples_per_shard))
    index_bytes = 16 * n  # the shard sample-index sidecars (offset, size per record), order of magnitude
    return int(n * trajectory_sample_bytes(cfg, round_idx) + shards * TAR_END + index_bytes)


def checkpoint_tag_bytes(cfg, parameters: int) -> dict:
    """Bytes of one checkpoint tag by kind (the sum over all ranks' files), for ``parameters`` logical
    parameters: DeepSpeed model + optimizer shards (weights in the training dtype, fp32 master and Adam
    moments), the consolidated weights, the EMA shadow shards and weights, universal.safetensors."""
    bf16 = cfg.train.precision == "bf16"
    w = 2 if bf16 else 4
    kinds = {"deepspeed": parameters * (w + (4 if bf16 else 0) + 8)}
    if cfg.checkpoint.consolidated:
        kinds["consolidated"] = parameters * w
    if cfg.train.ema_decay > 0:
        kinds["ema_shards"] = parameters * 4
        if cfg.checkpoint.consolidated:
            kinds["consolidated_ema"] = parameters * w
    if cfg.checkpoint.universal:
        kinds["universal"] = parameters * (12 + (4 if cfg.train.ema_decay > 0 else 0))
    kinds["total"] = sum(kinds.values())
    return kinds


def disk_plan(cfg, parameters: int) -> dict:
    """What a run of ``cfg`` writes: one checkpoint tag, the kept tags (``checkpoint.keep_last``), and for
    an offline MCD round its trajectory set. Every figure is an estimate from the file layouts."""
    tag = checkpoint_tag_bytes(cfg, parameters)
    keep = cfg.checkpoint.keep_last or max(1, cfg.train.steps // max(1, cfg.checkpoint.every or cfg.train.steps))
    plan = {"convention": "estimate from the file layouts (docs/recipes.md); checkpoint kinds summed over ranks",
            "checkpoint_tag_bytes": tag, "checkpoints_kept": keep,
            "checkpoints_bytes": tag["total"] * (keep + 1)}  # +1: a new tag is complete before the oldest goes
    if cfg.train.objective == "mcd" and cfg.distill.teacher_mode == "offline":
        n = round_samples(cfg)
        plan["trajectories"] = {"round": cfg.distill.round, "samples": n,
                                "bytes_per_sample": trajectory_sample_bytes(cfg),
                                "masked_fraction_at_s": round(masked_fraction_at_s(cfg), 4),
                                "bytes_per_round": trajectory_round_bytes(cfg, n)}
    plan["total_bytes"] = plan["checkpoints_bytes"] + plan.get("trajectories", {}).get("bytes_per_round", 0)
    plan["total_gib"] = round(plan["total_bytes"] / 2 ** 30, 2)
    return plan


FREE_BYTES_ENV = "MCD_FAULT_FREE_BYTES"  # tests: pretend the file system has this many bytes free


def free_bytes(path: str) -> tuple[int, str]:
    """(free bytes, the existing directory measured) of the file system ``path`` would be created on.
    Fault injection for tests: ``MCD_FAULT_FREE_BYTES=n`` reports n bytes free."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    fake = os.environ.get(FREE_BYTES_ENV)
    return (int(fake) if fake else int(shutil.disk_usage(probe).free)), probe


def human(n: float) -> str:
    """Bytes in the largest binary unit that keeps the figure >= 1 (for one-line messages)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


