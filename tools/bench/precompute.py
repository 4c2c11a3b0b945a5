#!/usr/bin/env python
"""Trajectory precompute against the bare teacher forward on the same batches. Prints one JSON object.

    python tools/bench/precompute.py                                   # ~1 minute on 2 CPU cores
    python tools/bench/precompute.py --samples 1024 --hidden 256 --layers 4 --seq-len 128 --vocab 4096

In a temporary directory: a random teacher of the given shape and random token shards (as
tools/bench/stream.py makes them). Then, alternating ``--repeats`` times in one process:

* ``precompute``: ``tools/precompute_trajectories.py`` in-process on one rank (fresh ``--out`` each time):
  read tokens, keyed times and reveal thresholds, teacher forward on z_s, top-k on the device, pack, write
  the shards and their sidecars -> samples/s as the tool reports it;
* ``forward``: the same teacher (same weights, ``eval``, ``no_grad``) on the same z_s batches, nothing
  else -> samples/s.

``ratio`` = median precompute samples/s / median forward samples/s (target >= 0.8). ``stages_s_per_sample``
breaks one pass of the tool's own steps down (host draws, forward, top-k, packing, shard writing), so a
gap names its cause. ``--device`` runs the forward side there; the tool puts its teacher on ``dims.device``
(CUDA whenever present, run with ``CUDA_VISIBLE_DEVICES=`` for an all-CPU measurement).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for p in (REPO,):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--samples", type=int, default=512, help="token samples to precompute")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32, help="teacher forward batch (the tool's --batch-size)")
    ap.add_argument("--samples-per-shard", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="alternating precompute / forward passes")
    ap.add_argument("--device", default=None, help="forward side: cpu, cuda or cuda:N (default: cuda when present)")
    return ap


def _forward_inputs(teacher: str, tokens: str, n: int, batch: int, params: dict):
    """The teacher (eval) and the exact (z_s, s) batches the tool feeds it."""
    from mcd_scale.config import load_config
    from mcd_scale.data.loader import open_prepared
    from mcd_scale.diffusion.duality import coupled_pair, reveal_thresholds
    from mcd_scale.diffusion.schedules import get_schedule
    from mcd_scale.distill.rounds import coupled_times
    from mcd_scale.data.trajectories import sample_time
    from mcd_scale.model.build import build_model
    from mcd_scale.model.weights import load_full_state_dict, load_safetensors

    cfg = load_config([os.path.join(teacher, "config.resolved.yaml")], [])
    model = build_model(cfg, None, init=False)
    load_full_state_dict(model, load_safetensors(os.path.join(teacher, "model.safetensors")), None)
    model.eval()
    train = open_prepared(tokens, "train", vocab_size=cfg.model.vocab_size, seq_len=cfg.model.seq_len)
    schedule = get_schedule(params["schedule"], params["eps"])
    th = params["thresholds"]
    batches = []
    for lo in range(0, n, batch):
        gids = torch.arange(lo, min(lo + batch, n))
        x = torch.from_numpy(np.stack([train[int(g)]["ids"] for g in gids]).astype(np.int64))
        t_raw = torch.tensor([sample_time(params["seed"], params["round"], int(g), params["t_min"]) for g in gids],
                             dtype=torch.float64)
        t, s = coupled_times(t_raw, params["dt"], params["t_min"])
        u = reveal_thresholds(gids, params["seq_len"], th["seed"], th["form"], K=th["K"], round_idx=th["round_idx"])
        batches.append((coupled_pair(x, t, s, u, schedule, params["mask_id"])[1], s.float()))
    return model, batches


def _forward_rate(model, batches, device) -> float:
    dev_batches = [(z.to(device), s.to(device)) for z, s in batches]
    n = sum(int(z.shape[0]) for z, _ in dev_batches)
    with torch.no_grad():
        t0 = time.perf_counter()
        for z, s in dev_batches:
            model(z, s)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return n / (time.perf_counter() - t0)


def _stages(model, batches_x, params, device, out_dir: str) -> dict:
    """One pass of the tool's own steps, each timed (seconds per sample): where a gap comes from."""
    from mcd_scale.data.shards import write_shards
    from mcd_scale.data.trajectories import sample_time
    from mcd_scale.diffusion.duality import coupled_pair, reveal_thresholds
    from mcd_scale.diffusion.schedules import get_schedule
    from mcd_scale.distill.rounds import coupled_times
    from mcd_scale.distill.targets import pack_batch, topk_from_logits

    acc = {"times_and_thresholds": 0.0, "forward": 0.0, "topk": 0.0, "pack": 0.0, "write": 0.0}
    schedule, th = get_schedule(params["schedule"], params["eps"]), params["thresholds"]
    records, n = [], 0
    with torch.no_grad():
        for gids, x in batches_x:
            t0 = time.perf_counter()
            t_raw = torch.tensor([sample_time(params["seed"], params["round"], int(g), params["t_min"])
                                  for g in gids.tolist()], dtype=torch.float64)
            t, s = coupled_times(t_raw, params["dt"], params["t_min"])
            u = reveal_thresholds(gids, params["seq_len"], th["seed"], th["form"], K=th["K"],
                                  round_idx=th["round_idx"])
            z_s = coupled_pair(x, t, s, u, schedule, params["mask_id"])[1].to(device)
            t1 = time.perf_counter()
            logits = model(z_s, s.to(device=device, dtype=torch.float32))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            targets = topk_from_logits(logits, z_s, params["vocab_size"], params["top_k"], params["temperature"])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t3 = time.perf_counter()
            packed = pack_batch(targets)
            t4 = time.perf_counter()
            for g, xi, p in zip(gids.tolist(), x.numpy(), packed):
                p["ids"], p["times"] = xi.astype(np.uint16), np.zeros(2)
                records.append((g, p))
            for k, v in zip(acc, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                acc[k] += v
            n += len(gids)
    t0 = time.perf_counter()
    write_shards(out_dir, iter(records), params["samples_per_shard"])
    acc["write"] = time.perf_counter() - t0
    return {k: round(v / n, 7) for k, v in acc.items()}


def main(argv=None) -> int:
    # stdout carries the one JSON object: the tools run here (trainer, precompute, DeepSpeed's logger) print to stderr
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    with contextlib.redirect_stdout(sys.stderr):
        result = _main(argv)
    if isinstance(result, dict):
        print(json.dumps(result, indent=1))
        return 0
    return result


def _main(argv=None):
    a = build_parser().parse_args(argv)
    from mcd_scale.parallel.device import DeviceFlagError, resolve_device

    try:
        device = resolve_device(a.device)
    except DeviceFlagError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    if min(a.samples, a.batch, a.repeats, a.samples_per_shard) < 1:
        print("bench: error: --samples, --batch, --repeats and --samples-per-shard must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)))))
    from mcd_scale.testing.bench_inputs import make_inputs, run_precompute  # the same inputs as bench/stream.py

    with tempfile.TemporaryDirectory(prefix="mcd_bench_precompute_") as root:
        cfg, teacher, tokens = make_inputs(root, a)
        pre, fwd, params = [], [], None
        model = batches = None
        for rep in range(a.repeats):
            out = os.path.join(root, f"traj{rep}")
            pre.append(run_precompute(teacher, tokens, out, a))
            if params is None:
                with open(os.path.join(out, "manifest.json"), encoding="utf-8") as fh:
                    params = json.load(fh)
                model, batches = _forward_inputs(teacher, tokens, a.samples, a.batch, params)
                model = model.to(device)
            fwd.append(_forward_rate(model, batches, device))
        from mcd_scale.data.loader import open_prepared

        train = open_prepared(tokens, "train", vocab_size=a.vocab, seq_len=a.seq_len)
        batches_x = [(torch.arange(lo, min(lo + a.batch, a.samples)),
                      torch.from_numpy(np.stack([train[g]["ids"] for g in range(lo, min(lo + a.batch, a.samples))])
                                       .astype(np.int64))) for lo in range(0, a.samples, a.batch)]
        stages = _stages(model, batches_x, params, device, os.path.join(root, "stages"))
        shard_bytes = sum(s["bytes"] for s in params["splits"]["train"]["shards"])
    pre_m, fwd_m = statistics.median(pre), statistics.median(fwd)
    total = sum(stages.values())
    return {
        "config": {k: v for k, v in vars(a).items()},
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "precompute_samples_per_s": round(pre_m, 2), "forward_samples_per_s": round(fwd_m, 2),
        "precompute_runs": [round(v, 2) for v in pre], "forward_runs": [round(v, 2) for v in fwd],
        "ratio": round(pre_m / fwd_m, 4), "target_ratio": 0.8,
        "stages_s_per_sample": stages, "stage_share": {k: round(v / total, 4) for k, v in stages.items()},
        "shard_bytes_per_sample": round(shard_bytes / a.samples, 1)}


if __name__ == "__main__":
    sys.exit(main())
