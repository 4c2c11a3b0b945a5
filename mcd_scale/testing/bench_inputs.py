"""Inputs shared by the streaming and precompute benchmarks (tools/bench/stream.py, tools/bench/precompute.py):
a random tiny teacher and random token shards, and one in-process precompute run. Kept in the package so the
benchmarks import it instead of each other; ``a`` is a benchmark's parsed flags (hidden, layers, heads, vocab,
seq_len, top_k, samples, samples_per_shard, batch)."""
from __future__ import annotations

import os

import numpy as np
import torch

from mcd_scale.config import load_config, save_resolved
from mcd_scale.data.manifest import write_manifest
from mcd_scale.parallel.distributed import shutdown
from mcd_scale.rng import keyed_generator

# The checkout's configs/ (benchmarks run from a checkout, never from an installed package).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_overrides(a) -> list[str]:
    return [f"model.hidden={a.hidden}", f"model.layers={a.layers}", f"model.heads={a.heads}",
            f"model.ffn_hidden={4 * a.hidden}", f"model.vocab_size={a.vocab}", f"model.seq_len={a.seq_len}",
            "model.pad_vocab_multiple=64", f"distill.top_k={a.top_k}", "distill.dt0=0.02"]


def make_inputs(root: str, a):
    # lazy: loads megatron, webdataset; importing this module does not need them
    from mcd_scale.data.loader import TOKENS_FORMAT, TOKENS_FORMAT_VERSION
    from mcd_scale.data.shards import write_shards
    from mcd_scale.model.build import build_model
    from mcd_scale.model.weights import full_state_dict, save_safetensors

    cfg = load_config([os.path.join(REPO, "configs", "tiny", "teacher.yaml")], tiny_overrides(a))
    teacher = os.path.join(root, "teacher")
    save_safetensors(full_state_dict(build_model(cfg, None, init=True)), os.path.join(teacher, "model.safetensors"))
    save_resolved(cfg, os.path.join(teacher, "config.resolved.yaml"))
    tokens = os.path.join(root, "tokens")
    rows = torch.randint(0, a.vocab, (a.samples, a.seq_len), generator=keyed_generator("bench-stream", 0))
    rows = rows.numpy().astype(np.uint16)
    shards = write_shards(os.path.join(tokens, "train"), ((g, {"ids": r}) for g, r in enumerate(rows)), 256)
    # a small val split: the trainer opens one (validation is off in the timed distillation run)
    val_rows = rows[:max(1, min(16, a.samples))]
    val = write_shards(os.path.join(tokens, "val"), ((g, {"ids": r}) for g, r in enumerate(val_rows)), 256)
    write_manifest(tokens, {"format": TOKENS_FORMAT, "format_version": TOKENS_FORMAT_VERSION, "vocab_size": a.vocab,
                            "mask_id": a.vocab, "seq_len": a.seq_len, "dtype": "uint16",
                            "tokenizer": {"sha256": "bench"},
                            "splits": {"train": {"dir": "train", "num_samples": a.samples, "shards": shards},
                                       "val": {"dir": "val", "num_samples": len(val_rows), "shards": val}}})
    return cfg, teacher, tokens


def run_precompute(teacher: str, tokens: str, out: str, a) -> float:
    # lazy: loads webdataset; importing this module does not need it
    from mcd_scale.training.precompute import build_parser, precompute

    args = build_parser().parse_args(["--teacher", teacher, "--data", tokens, "--out", out, "--no-progress",
                                      "--samples-per-shard", str(a.samples_per_shard),
                                      "--batch-size", str(a.batch)])
    saved = dict(os.environ)
    try:
        res = precompute(args)
    finally:
        shutdown()
        os.environ.clear()
        os.environ.update(saved)
    return res["samples_per_s"]
