#!/usr/bin/env python
"""Our training step against a plain PyTorch loop on the same model and batches. Prints one JSON object.

    python tools/bench/train_overhead.py                      # the tiny teacher shape, ZeRO-0 x 1 rank, ZeRO-3 x 2
    python tools/bench/train_overhead.py --layouts 0x1 --steps 30 --profile 3

For each layout (``ZxN``: ZeRO stage Z on N gloo ranks, one process per rank, started by this script) three
loops train the same model (``build_model`` of the config, identical initial weights) with AdamW, the same
learning-rate schedule and gradient clipping, on the same token batches, alternating step by step in one
run (the order rotates every step so that neither side always runs first after the other's allocations):

* ``ours``: what ``Trainer.fit`` does per step: ``MdlmObjective.prepare`` (keyed times and masks) then
  ``TrainEngine.train_step`` (DeepSpeed engine of our derived config, non-finite guard, the one
  collective of the step);
* ``deepspeed``: the same prepared inputs through a bare ``deepspeed.initialize`` engine of the same
  DeepSpeed config (forward, loss, ``engine.backward``, ``engine.step``), so the gap between ``ours`` and
  ``deepspeed`` is our code, and the gap between ``deepspeed`` and ``plain`` is DeepSpeed's (ZeRO-3's
  gathers and partitioned step);
* ``plain``: a hand-written loop (``torch.rand`` masking, forward, cross-entropy weighted by the NELBO
  weight, backward, ``clip_grad_norm_``, ``AdamW.step``), wrapped in ``DistributedDataParallel`` on
  more than one rank.

``ratio`` = median ours step / median plain step (target <= 1.10); ``ratio_paired`` = median over steps of
that step's ratio; ``ratio_vs_deepspeed`` = ours / deepspeed; ``prepare_share`` = the keyed masking's part
of our step. Every loss is read to the host each step (as ``train_step`` does), so a timing includes the
work. ``--profile N`` adds the top operators of N profiled ``ours`` steps (torch.profiler, self CPU time).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SIDES = ("ours", "deepspeed", "plain")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", default="configs/tiny/teacher.yaml", help="model shape and optimizer")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--layouts", nargs="+", default=["0x1", "3x2"], help="ZeRO stage x ranks, e.g. 0x1 3x2")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per side (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the config's parallel.micro_batch")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    ap.add_argument("--profile", type=int, default=0, help="profile N extra steps of ours and of the bare engine (rank 0 reports)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per layout before the ranks are killed")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--zero", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return ap


def _parse_layout(text: str) -> tuple[int, int]:
    try:
        zero, ranks = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--layouts {text!r}: expected ZxN (ZeRO stage x ranks), e.g. 0x1 or 3x2") from None
    if zero not in (0, 1, 2, 3) or ranks < 1:
        raise ValueError(f"--layouts {text!r}: ZeRO stage must be 0..3 and ranks >= 1")
    return zero, ranks


# ------------------------------------------------------------------------------------------------ worker


def _config(a, world: int):
    from mcd_scale.config import load_config, validate_layout

    cfg = load_config([os.path.join(REPO, a.config)], list(a.overrides))
    mb = a.micro_batch or cfg.parallel.micro_batch
    cfg.parallel.zero_stage, cfg.parallel.micro_batch, cfg.parallel.global_batch = a.zero, mb, mb * world
    cfg.parallel.tp = cfg.parallel.pp = 1
    cfg.train.steps = a.warmup + a.steps + a.profile
    validate_layout(cfg, world)
    return cfg


def _batches(cfg, dims, n: int) -> list[dict]:
    """n micro-batches of this DP rank as the loader hands them out (ids, sample_id, position)."""
    import torch

    from mcd_scale.rng import keyed_generator

    m, mb = cfg.model, cfg.parallel.micro_batch
    out = []
    for step in range(n):
        pos = torch.arange(dims.dp_rank * mb, (dims.dp_rank + 1) * mb)
        ids = torch.randint(0, m.vocab_size, (mb, m.seq_len), generator=keyed_generator("bench-overhead", step))
        out.append({"ids": ids, "sample_id": pos + step * cfg.parallel.global_batch, "position": pos})
    return out


class _Plain:
    """The hand-written reference loop (DDP on more than one rank)."""

    def __init__(self, cfg, dims):
        import torch

        from mcd_scale.training.engine import lr_lambda
        from mcd_scale.model.build import build_model
        from mcd_scale.training.optim import adamw_options

        self.cfg, self.dims = cfg, dims
        model = build_model(cfg, None, init=True).to(dims.device)
        if dims.world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), **adamw_options(cfg, dims.device.type))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.gen = torch.Generator().manual_seed(cfg.train.seed + dims.dp_rank)

    def step(self, micro: dict) -> float:
        import torch
        import torch.nn.functional as F

        m, eps = self.cfg.model, 1e-3
        x = micro["ids"].long().to(self.dims.device)
        t = torch.rand(x.shape[0], generator=self.gen) * (1 - eps) + eps  # log-linear schedule: alpha = 1 - t
        masked = torch.rand(x.shape, generator=self.gen) < t[:, None]
        z = torch.where(masked.to(x.device), torch.full_like(x, m.mask_id), x)
        w = (masked / t[:, None]).to(self.dims.device)
        logits = self.model(z, t.to(self.dims.device))[..., :m.vocab_size].float()
        ce = F.cross_entropy(logits.reshape(-1, m.vocab_size), x.reshape(-1), reduction="none")
        loss = (ce.view_as(w) * w).sum() / x.numel()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optimizer.grad_clip)
        self.opt.step()
        self.sched.step()
        return float(loss.item())


class _BareDeepSpeed:
    """deepspeed.initialize on the same model and DeepSpeed config, with none of our engine code."""

    def __init__(self, cfg, dims, objective):
        import deepspeed
        import torch

        from mcd_scale.parallel.deepspeed import deepspeed_config
        from mcd_scale.training.engine import lr_lambda
        from mcd_scale.model.build import build_model
        from mcd_scale.training.optim import adamw_options

        ds_cfg = deepspeed_config(cfg, dims.world_size)
        model = build_model(cfg, dims, ds_config=ds_cfg, init=True)
        opt = torch.optim.AdamW(model.parameters(), **adamw_options(cfg, dims.device.type))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg,
                                               mpu=dims.mpu(), dist_init_required=False)
        self.objective, self.device = objective, dims.device

    def step(self, prepared) -> float:
        (z, t), labels = prepared
        loss = self.objective.loss(self.engine(z.to(self.device), t.to(self.device)),
                                   tuple(v.to(self.device) for v in labels))
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.item())


def _profile(fn, n: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(n):
            fn(i)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / n, 3), "calls_per_step": e.count / n}
            for e in rows]


def worker(a) -> int:
    import torch

    from mcd_scale.parallel import collectives
    from mcd_scale.parallel.distributed import init_distributed, shutdown
    from mcd_scale.training.engine import TrainEngine
    from mcd_scale.training.objectives import MdlmObjective

    if a.threads:
        torch.set_num_threads(a.threads)
    dims = init_distributed(1, 1)
    cfg = _config(a, dims.world_size)
    objective = MdlmObjective(cfg, dims)
    ours = TrainEngine(cfg, dims, objective.loss)
    bare = _BareDeepSpeed(cfg, dims, objective)
    plain = _Plain(cfg, dims)
    n = a.warmup + a.steps
    batches = _batches(cfg, dims, n + a.profile)
    times = {s: [] for s in SIDES}
    prep_s, losses = [], {s: [] for s in SIDES}

    def run_ours(step):
        t0 = time.perf_counter()
        prepared = [objective.prepare(batches[step], step)]
        t1 = time.perf_counter()
        loss, _, _ = ours.train_step(prepared)
        return loss, t1 - t0

    for step in range(n):
        order = SIDES[step % 3:] + SIDES[:step % 3]
        for side in order:
            # the bare engine gets ours's prepared inputs, prepared outside its timer
            ready = objective.prepare(batches[step], step) if side == "deepspeed" else None
            collectives.barrier()  # every rank starts the side together (a straggler would time the wait)
            t0 = time.perf_counter()
            if side == "ours":
                loss, prep = run_ours(step)
            elif side == "deepspeed":
                loss, prep = bare.step(ready), 0.0
            else:
                loss, prep = plain.step(batches[step]), 0.0
            dt = time.perf_counter() - t0
            if step >= a.warmup:
                times[side].append(dt)
                if side == "ours":
                    prep_s.append(prep)
            losses[side].append(loss)
    top = {}
    if a.profile:
        top["ours"] = _profile(lambda i: run_ours(n + i), a.profile)
        ready = [objective.prepare(batches[n + i], n + i) for i in range(a.profile)]
        top["deepspeed"] = _profile(lambda i: bare.step(ready[i]), a.profile)
    if collectives.rank() == 0:
        med = {s: statistics.median(v) for s, v in times.items()}
        paired = [o / p for o, p in zip(times["ours"], times["plain"])]
        res = {"zero_stage": a.zero, "ranks": dims.world_size, "device": str(dims.device),
               "torch_threads": torch.get_num_threads(), "micro_batch": cfg.parallel.micro_batch,
               "seq_len": cfg.model.seq_len, "params": sum(p.numel() for p in plain.model.parameters()),
               "timed_steps": a.steps, "step_s": {s: round(v, 5) for s, v in med.items()},
               "step_s_min": {s: round(min(v), 5) for s, v in times.items()},
               "ratio": round(med["ours"] / med["plain"], 4),
               "ratio_paired": round(statistics.median(paired), 4),
               "ratio_min": round(min(times["ours"]) / min(times["plain"]), 4),
               "ratio_vs_deepspeed": round(med["ours"] / med["deepspeed"], 4),
               "deepspeed_vs_plain": round(med["deepspeed"] / med["plain"], 4),
               "prepare_share": round(statistics.median(prep_s) / med["ours"], 4),
               "first_loss": {s: round(v[0], 5) for s, v in losses.items()},
               "last_loss": {s: round(v[-1], 5) for s, v in losses.items()}}
        for side, ops in top.items():
            res[f"profile_{side}_top_ops"] = ops
        with open(a.out, "w", encoding="utf-8") as fh:
            json.dump(res, fh)
    shutdown()
    return 0


# ------------------------------------------------------------------------------------------------ driver


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_layout(argv: list[str], zero: int, ranks: int, threads: int, timeout: float, root: str) -> dict:
    out = os.path.join(root, f"zero{zero}_x{ranks}.json")
    port = str(_free_port())
    procs = []
    for r in range(ranks):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(ranks), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(ranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS=str(threads), MCD_QUIET="1",
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", "--zero", str(zero), "--out", out,
               "--threads", str(threads)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    deadline = time.time() + timeout
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(deadline - time.time(), 1))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"layout ZeRO-{zero} x {ranks} ranks: no result within --timeout {timeout:.0f} s")
    if any(p.returncode != 0 for p in procs) or not os.path.exists(out):
        tail = "\n".join(log[-3000:] for log in logs)
        raise RuntimeError(f"layout ZeRO-{zero} x {ranks} ranks failed (exit codes "
                           f"{[p.returncode for p in procs]}):\n{tail}")
    with open(out, encoding="utf-8") as fh:
        return json.load(fh)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.worker:
        return worker(a)
    try:
        layouts = [_parse_layout(v) for v in a.layouts]
    except ValueError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    if a.steps < 1 or a.warmup < 0 or a.profile < 0:
        print("bench: error: --steps must be >= 1, --warmup and --profile >= 0", file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    results = []
    with tempfile.TemporaryDirectory(prefix="mcd_bench_overhead_") as root:
        for zero, ranks in layouts:
            threads = a.threads or max(1, cores // ranks)
            results.append(_run_layout(argv, zero, ranks, threads, a.timeout, root))
    print(json.dumps({"config": a.config, "overrides": a.overrides, "cores": cores, "target_ratio": 1.10,
                      "layouts": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
