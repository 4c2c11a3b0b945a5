#!/usr/bin/env python
"""Does the trajectory reader keep a student fed? Prints one JSON object.

    python tools/bench/stream.py                     # tiny defaults, < 1 minute on 2 CPU cores
    python tools/bench/stream.py --samples 512 --hidden 128 --seq-len 64

In one run, in a temporary directory: a random tiny teacher + random token shards, then
tools/precompute_trajectories.py in-process (single rank) -> ``precompute_samples_per_s``; then the
samples/s that :class:`MicroBatchLoader` delivers from the trajectory shards with 0, 1 and 2 reader
workers (``reader_samples_per_s``), and the samples/s a tiny student consumes (forward + backward +
AdamW step of ``build_model`` on z_t with a top-k cross-entropy to the teacher targets,
``student_samples_per_s``). ``headroom_w`` = reader / student rate: > 1 means data is not the
bottleneck at that worker count.

``distill_step``: a real offline MCD run on those shards (``run_training``, one rank, ZeRO-0,
``--distill-steps`` steps, ``--distill-workers`` loader workers) and the trainer's own data-wait share of
the step (``data_wait_pct_steady``: median over steps 2.., target <= 2%).

``--device`` (default: cuda when present) is where the student trains; the precompute runs where the
tool puts its teacher, ``dims.device`` of its process group (cuda under NCCL, i.e. whenever CUDA is
present; run with ``CUDA_VISIBLE_DEVICES=`` for an all-CPU measurement).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mcd_scale.testing.bench_inputs import make_inputs, run_precompute  # noqa: E402


def _reader_rate(ds, workers: int, a) -> float:
    from mcd_scale.data.loader import MicroBatchLoader
    from mcd_scale.data.sampler import GlobalBatchSampler

    steps = max(1, a.read_samples // a.batch)
    loader = MicroBatchLoader(ds, GlobalBatchSampler(len(ds), a.batch, seed=0), 0, 1, a.batch, start_step=0,
                              num_workers=workers, max_steps=steps)
    t0 = time.perf_counter()
    n = sum(int(b["sample_id"].numel()) for b in loader)  # includes worker start-up, as a trainer sees it
    return n / (time.perf_counter() - t0)


def _student_rate(cfg, ds, a, device) -> float:
    from mcd_scale.data.loader import collate_samples
    from mcd_scale.model.build import build_model

    model = build_model(cfg, None, init=True).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    V = cfg.model.vocab_size
    batches = [collate_samples([(g, g, ds[g]) for g in range(i, i + a.batch)])
               for i in range(0, min(len(ds), 4 * a.batch) - a.batch + 1, a.batch)]
    pairs = [(ds.coupled_pair(b)[0].to(device), {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()})
             for b in batches]

    def step(z_t, b):
        logits = model(z_t, b["t"].float())[..., :V].float()
        logp = torch.log_softmax(logits, -1).gather(-1, b["tk_ids"])  # [B, L, k]
        w = b["tk_logp"].exp() * b["tk_mask"].unsqueeze(-1)
        loss = -(w * logp).sum() / b["tk_mask"].sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(*pairs[0])  # warm-up
    t0 = time.perf_counter()
    n = 0
    for i in range(a.student_steps):
        z_t, b = pairs[i % len(pairs)]
        step(z_t, b)
        n += int(z_t.shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the steps above were only queued
    return n / (time.perf_counter() - t0)


def _distill_wait(cfg, root: str, a) -> dict:
    """A real offline MCD run (``run_training``, the entry of mcd_scale/train.py, one rank) on the trajectory
    shards: the trainer's own data-wait share (time blocked in ``next(loader)`` / wall time), per logged step.
    Step 1 also waits for the loader's workers to start, so the steady figure is the median of the later steps."""
    import copy
    import json as _json
    import statistics

    from mcd_scale.parallel.distributed import shutdown
    from mcd_scale.training.trainer import run_training

    c = copy.deepcopy(cfg)
    c.run.dir = os.path.join(root, "distill")
    c.train.objective, c.distill.teacher_mode = "mcd", "offline"
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.ema_decay = a.distill_steps, 1, 0, 0.0
    c.parallel.tp = c.parallel.pp = 1
    c.parallel.zero_stage, c.parallel.micro_batch, c.parallel.global_batch = 0, a.batch, a.batch
    c.checkpoint.every, c.checkpoint.keep_last = 0, 1
    c.data.num_workers = a.distill_workers
    c.logging.tensorboard = False
    saved = dict(os.environ)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()), MCD_QUIET="1")
    try:
        code = run_training(c)
    finally:
        shutdown()
        os.environ.clear()
        os.environ.update(saved)
    with open(os.path.join(c.run.dir, "metrics.jsonl"), encoding="utf-8") as fh:
        rows = [r for r in (_json.loads(line) for line in fh if line.strip()) if "data_wait_pct" in r]
    later = [r["data_wait_pct"] for r in rows[1:]] or [rows[0]["data_wait_pct"]]
    return {"exit_code": code, "steps": len(rows), "workers": a.distill_workers,
            "data_wait_pct_steady": round(statistics.median(later), 3),
            "data_wait_pct_max_steady": round(max(later), 3),
            "data_wait_pct_step1": round(rows[0]["data_wait_pct"], 3),
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows[1:] or rows), 1),
            "target_pct": 2.0}


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--samples", type=int, default=128, help="token samples to precompute")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=250)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16, help="teacher batch, reader micro-batch, student batch")
    ap.add_argument("--samples-per-shard", type=int, default=32)
    ap.add_argument("--read-samples", type=int, default=512, help="samples read per worker setting")
    ap.add_argument("--student-steps", type=int, default=10)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--distill-steps", type=int, default=8, help="steps of the real distillation run (0: skip it)")
    ap.add_argument("--distill-workers", type=int, default=1, help="data.num_workers of that run")
    ap.add_argument("--device", default=None, help="student device: cpu, cuda or cuda:N (default: cuda when present)")
    a = ap.parse_args(argv)
    from mcd_scale.parallel.device import DeviceFlagError, resolve_device

    try:
        device = resolve_device(a.device)
    except DeviceFlagError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    from mcd_scale.data.trajectories import open_trajectories

    with tempfile.TemporaryDirectory(prefix="mcd_bench_stream_") as root:
        cfg, teacher, tokens = make_inputs(root, a)
        out = os.path.join(root, "traj")
        pre = run_precompute(teacher, tokens, out, a)
        cfg.data.path, cfg.data.trajectories, cfg.distill.teacher = tokens, out, teacher
        ds = open_trajectories(cfg)
        reader = {str(w): round(_reader_rate(ds, int(w), a), 1) for w in a.workers.split(",")}
        student = _student_rate(cfg, ds, a, device)
        shard_bytes = sum(s["bytes"] for s in ds.manifest["splits"]["train"]["shards"])
        distill = _distill_wait(cfg, root, a) if a.distill_steps > 0 else None
    result = {
        "config": {k: v for k, v in vars(a).items()},
        "torch_threads": torch.get_num_threads(),
        "precompute_samples_per_s": round(pre, 1),
        "reader_samples_per_s": reader,
        "student_samples_per_s": round(student, 1),
        "headroom_w": {w: round(r / student, 2) for w, r in reader.items()},
        "shard_bytes_per_sample": round(shard_bytes / a.samples, 1),
        "distill_step": distill,
    }
    return result


if __name__ == "__main__":
    sys.exit(main())
