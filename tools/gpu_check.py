#!/usr/bin/env python
"""GPU acceptance check: one command, one JSON line per row as it finishes (each with ``ok`` and its figures).

    python tools/gpu_check.py                      # on a GPU machine: world size 1 under NCCL
    python tools/gpu_check.py --nproc 2            # two GPUs: relaunches itself under torchrun
    python tools/gpu_check.py --device cpu --tiny  # the same code paths on CPU (gloo), tiny models (CI)
    bash tools/gpu_check.sh                        # the lent GPU machine: installs the carried wheels first

On the lent GPU machine deepspeed, megatron-core and webdataset are not installed and no package
registry is reachable: carry their wheels in ``.whl/`` (docs/performance.md, "GPU acceptance check")
and run ``tools/gpu_check.sh``, which installs them into ``.site`` and runs this script under a timeout.

Every check goes through the product's entry points in a temporary run directory this script creates
(and deletes unless ``--keep``): ``mcd_scale.training.trainer.run_training`` (the engine of ``mcd_scale/train.py``)
for the teacher menus, MCD online/offline and SDTT; ``tools/precompute_trajectories.py`` for the
offline targets (teacher on the device); ``tools/sample.py`` for sampling. Rows:

* ``teacher_tp_zero3`` / ``teacher_3d``: a few teacher steps on menu (b) TP+ZeRO-3 and menu (a) 3D at
  TP = PP = 1; finite losses, a checkpoint written.
* ``precompute``: trajectories of a few samples from that teacher; samples/s, shard bytes per sample.
* ``mcd_online`` / ``mcd_offline`` / ``sdtt``: a few student steps of each objective from that teacher.
* ``sampling``: tools/sample.py on the teacher; NFE, seconds per sample, and on a GPU whether the
  tokens equal the CPU's for the same key (``identical_to_cpu``).
* ``bf16_vs_fp32``: the MDLM loss of one batch with bf16 weights against fp32 weights (relative difference).
* ``step_time``: the 1B model (``configs/teacher_1b.yaml``; ``--tiny``: the tiny teacher) at TP = 1,
  ZeRO-3, bf16, one row per (micro-batch, activation checkpointing): step seconds, tokens/s, TFLOP/s
  per device and MFU against the named peak (H100 SXM / H200 bf16 dense: 989 TFLOP/s), peak memory
  (``torch.cuda.max_memory_allocated``) beside the dry-run plan (``mcd_scale.parallel.memory_plan``).

Output: one JSON line per row on stdout, printed (and appended to ``--out``) as the row finishes -- the
step-time configurations each get their own ``step_time/...`` line too -- then a ``"summary": true`` line.
A row that raises, or runs past ``--row-budget-s``, is a failed row; the next one runs. ``--rows`` picks rows.

Exit codes: 0 every row ok, 1 some row not ok, 2 bad arguments or missing packages.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO,):
    if _p not in sys.path:
        sys.path.insert(0, _p)

REQUIRED = ("deepspeed", "megatron.core", "webdataset")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # SXM, bf16 dense (no sparsity)
ROWS = ("teacher_tp_zero3", "teacher_3d", "precompute", "mcd_online", "mcd_offline", "sdtt", "sampling",
        "bf16_vs_fp32", "step_time")

# Tiny shapes: every check's model (the step-time row too with --tiny); fast on 2 CPU cores.
TINY_MODEL = ["model.vocab_size=61", "model.seq_len=16", "model.hidden=32", "model.layers=2", "model.heads=2",
              "model.ffn_hidden=64", "model.pad_vocab_multiple=8"]
# Small shapes for the functional checks on a GPU (the 1B model only in the step-time row).
SMALL_MODEL = ["model.vocab_size=4096", "model.seq_len=128", "model.hidden=256", "model.layers=4", "model.heads=4",
               "model.ffn_hidden=1024", "model.pad_vocab_multiple=128"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="cuda (NCCL) or cpu (gloo); default: cuda when present")
    ap.add_argument("--tiny", action="store_true", help="tiny models everywhere (the CI mode with --device cpu)")
    ap.add_argument("--nproc", type=int, default=1, help="ranks (GPUs); >1 relaunches under torchrun")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per training check")
    ap.add_argument("--micro-batches", type=int, nargs="+", default=None,
                    help="step-time micro-batch sizes (default: 4 8 16 on a GPU, 2 with --tiny)")
    ap.add_argument("--rows", "--only", dest="rows", nargs="+", choices=ROWS, default=None,
                    help="run only these rows (a row that needs an earlier one's output fails alone without it)")
    ap.add_argument("--row-budget-s", type=float, default=300.0,
                    help="wall-clock budget of one row in seconds; a row past it is reported failed and the next starts")
    ap.add_argument("--out", default=None, help="also append each JSON line here as it is printed")
    ap.add_argument("--keep", default=None, help="keep the run directories under this path")
    return ap


def missing_packages() -> list[str]:
    missing = []
    for name in REQUIRED:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:
            missing.append(name)
    return missing


# ------------------------------------------------------------------------------------------------
# Inputs


class Ctx:
    """What every check shares: the device, the layout, the temp root, the tiny/GPU shapes."""

    def __init__(self, args, dims, root: str):
        import torch

        self.args, self.dims, self.root = args, dims, root
        self.device = dims.device
        self.cuda = self.device.type == "cuda"
        self.model = TINY_MODEL if args.tiny else SMALL_MODEL
        self.tokens = os.path.join(root, "tokens")
        self.teacher_dir = os.path.join(root, "teacher_tp_zero3")
        self.gpu_name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        self.world = dims.world_size

    def override(self, name: str) -> str:
        return os.path.join(self.root, name)

    def common(self, run: str) -> list[str]:
        mb = 2
        return [f"run.dir={self.override(run)}", f"data.path={self.tokens}", "data.num_workers=0",
                f"train.steps={self.args.steps}", "train.log_every=1", "train.eval_every=0",
                f"parallel.micro_batch={mb}", f"parallel.global_batch={mb * self.world}",
                "parallel.tp=1", "parallel.pp=1", "logging.tensorboard=false", "schedule.warmup_steps=1",
                f"train.precision={'bf16' if self.cuda else 'fp32'}"]


def make_tokens(ctx: Ctx, cfg, directory: str) -> None:
    """Random token shards (train + val) of the check model's vocabulary and length (rank 0 writes)."""
    import numpy as np
    import torch

    from mcd_scale.parallel import collectives
    from mcd_scale.data.loader import TOKENS_FORMAT, TOKENS_FORMAT_VERSION
    from mcd_scale.data.manifest import write_manifest
    from mcd_scale.data.shards import write_shards
    from mcd_scale.rng import keyed_generator

    if collectives.rank() == 0:
        V, L = cfg.model.vocab_size, cfg.model.seq_len
        rows = torch.randint(0, V, (64, L), generator=keyed_generator("gpu-check-tokens", V, L)).numpy()
        rows = rows.astype(np.uint16 if V < 65536 else np.uint32)
        splits = {}
        for split, data in (("train", rows[:48]), ("val", rows[48:])):
            shards = write_shards(os.path.join(directory, split), ((g, {"ids": r}) for g, r in enumerate(data)), 16)
            splits[split] = {"dir": split, "num_samples": len(data), "shards": shards}
        write_manifest(directory, {"format": TOKENS_FORMAT, "format_version": TOKENS_FORMAT_VERSION,
                                    "vocab_size": V, "mask_id": V, "seq_len": L, "dtype": str(rows.dtype),
                                    "splits": splits, "tokenizer": {"sha256": "gpu-check"}})
    collectives.barrier()


def load(files: Sequence[str], overrides: Sequence[str]):
    from mcd_scale.config import load_config, validate_layout
    from mcd_scale.parallel import collectives

    cfg = load_config([os.path.join(REPO, f) for f in files], list(overrides))
    validate_layout(cfg, collectives.world_size())
    return cfg


def train(ctx: Ctx, cfg) -> dict:
    """run_training (the entry of mcd_scale/train.py) on the live process group; the metrics it logged."""
    from mcd_scale.training.trainer import run_training

    code = run_training(cfg, ctx.dims)
    path = os.path.join(cfg.run.dir, "metrics.jsonl")
    recs = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            recs = [json.loads(line) for line in fh if line.strip()]
    train_recs = [r for r in recs if "loss" in r]
    losses = [r["loss"] for r in train_recs]
    finite = bool(losses) and all(v == v and abs(v) != float("inf") for v in losses)
    return {"ok": code == 0 and finite and len(losses) == cfg.train.steps, "exit_code": code,
            "losses": [round(v, 5) for v in losses], "records": train_recs}


# ------------------------------------------------------------------------------------------------
# Checks


def check_teacher(ctx: Ctx, menu: str) -> dict:
    zero = 3 if menu == "tp_zero3" else 1
    run = f"teacher_{menu}"
    cfg = load(["configs/tiny/teacher.yaml"], ctx.model + ctx.common(run) + [
        f"parallel.zero_stage={zero}", f"checkpoint.every={ctx.args.steps}"])
    res = train(ctx, cfg)
    ckpt = os.path.join(cfg.run.dir, "checkpoints", "latest")
    res["checkpoint"] = os.path.isfile(ckpt)
    res["ok"] = res["ok"] and res["checkpoint"]
    res["zero_stage"] = zero
    res.pop("records")
    return res


def distill_cfg(ctx: Ctx, run: str, extra: Sequence[str]):
    return load(["configs/tiny/distill.yaml"], ctx.model + ctx.common(run) + [
        "parallel.zero_stage=3", f"distill.teacher={ctx.teacher_dir}", "distill.top_k=8", "checkpoint.every=0",
        "train.ema_decay=0"] + list(extra))


def check_precompute(ctx: Ctx) -> dict:
    from mcd_scale.parallel import collectives
    from mcd_scale.config import save_resolved
    from mcd_scale.training.precompute import build_parser as pre_parser, precompute

    cfg = distill_cfg(ctx, "precompute_cfg", ["distill.teacher_mode=offline"])
    cfg_file = os.path.join(ctx.root, "distill.resolved.yaml")
    if collectives.rank() == 0:
        save_resolved(cfg, cfg_file)
    collectives.barrier()
    out = os.path.join(ctx.root, "traj")
    args = pre_parser().parse_args(["--teacher", ctx.teacher_dir, "--data", ctx.tokens, "--out", out,
                                    "--config", cfg_file, "--samples-per-shard", "16", "--batch-size", "8",
                                    "--limit", "32", "--no-progress"])
    res = precompute(args)
    shards = (res["manifest"] or {}).get("splits", {}).get("train", {}).get("shards", [])
    n = (res["manifest"] or {}).get("num_samples", 0)
    return {"ok": collectives.rank() != 0 or (n == 32 and res["computed"] == 32), "samples": n,
            "samples_per_s": round(res["samples_per_s"], 2),
            "shard_bytes_per_sample": round(sum(s["bytes"] for s in shards) / max(n, 1), 1), "out": out}


def check_distill(ctx: Ctx, name: str, extra: Sequence[str]) -> dict:
    res = train(ctx, distill_cfg(ctx, name, extra))
    res.pop("records")
    return res


def check_sampling(ctx: Ctx) -> dict:
    import torch

    from mcd_scale import inference as sample_cli

    from mcd_scale.parallel import collectives

    if collectives.rank() != 0:
        return {"ok": True}
    out = os.path.join(ctx.root, "samples.jsonl")
    # rank 0 alone samples here (single_process): the other ranks are not in this call
    job = sample_cli.SampleJob(checkpoint=ctx.teacher_dir, steps=8, num_samples=4, sampler="coupled",
                               device=str(ctx.device), out=out, progress=False, single_process=True)
    rc = 0 if sample_cli.run_sampling(job) else 1
    with open(out + ".summary.json", encoding="utf-8") as fh:
        summary = json.load(fh)
    row = {"ok": rc == 0 and summary["device"] == str(ctx.device), "exit_code": rc, "device": summary["device"],
           "nfe": summary["nfe"], "seconds_per_sample": round(summary["seconds_per_sample"], 5)}
    if ctx.cuda:  # the same key on the host must give the same tokens (keyed draws are made on the host)
        with open(out, encoding="utf-8") as fh:
            dev_ids = [json.loads(line)["ids"] for line in fh]
        host = sample_cli.sample(sample_cli.load_model(ctx.teacher_dir, device="cpu"), 8, 4, 0, sampler="coupled")
        row["identical_to_cpu"] = host.tokens.tolist() == dev_ids
        row["ok"] = row["ok"] and row["identical_to_cpu"]
    torch.cuda.empty_cache() if ctx.cuda else None
    return row


def check_bf16(ctx: Ctx) -> dict:
    """MDLM loss of one keyed batch with the teacher's weights in fp32 and in bf16."""
    import torch

    from mcd_scale.diffusion.schedules import get_schedule
    from mcd_scale.model.build import build_model
    from mcd_scale.model.weights import load_full_state_dict, load_safetensors
    from mcd_scale.distill.checkpoints import resolve_teacher_file
    from mcd_scale.rng import keyed_generator

    cfg = load(["configs/tiny/teacher.yaml"], ctx.model + ctx.common("bf16"))
    state = load_safetensors(resolve_teacher_file(ctx.teacher_dir))
    V, L, B = cfg.model.vocab_size, cfg.model.seq_len, 4
    gen = keyed_generator("gpu-check-bf16", V, L)
    x = torch.randint(0, V, (B, L), generator=gen)
    t = torch.rand(B, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    alpha = get_schedule(cfg.diffusion.schedule, cfg.diffusion.eps).alpha(t).unsqueeze(1)
    z = torch.where(torch.rand(B, L, generator=gen, dtype=torch.float64) < alpha, x, torch.full_like(x, V))
    masked = z == V
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(cfg, None, init=False, dtype=dtype).to(ctx.device).eval()
        load_full_state_dict(model, state, None)
        with torch.no_grad():
            logits = model(z.to(ctx.device), t.float().to(ctx.device))[..., :V].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x.to(ctx.device), reduction="none")
        losses[str(dtype).split(".")[-1]] = float((nll * masked.to(ctx.device)).sum() / masked.sum().clamp(min=1))
    rel = abs(losses["bfloat16"] - losses["float32"]) / max(abs(losses["float32"]), 1e-12)
    return {"ok": rel < 0.02, "loss_fp32": round(losses["float32"], 6), "loss_bf16": round(losses["bfloat16"], 6),
            "rel_diff": round(rel, 6), "tolerance": 0.02}


def timed_steps(ctx: Ctx, cfg, steps: int) -> dict:
    """The trainer's own engine and objective (``Trainer(cfg, dims)``), stepped like ``Trainer.fit`` but
    without its end-of-run checkpoint (a 1B ZeRO-3 save per row would cost minutes and ~17 GB of disk).
    Step 1 is warm-up; the rest are timed one by one (``train_step`` returns the loss to the host, so
    each timing includes the device's work)."""
    from mcd_scale.data.loader import MicroBatchLoader
    from mcd_scale.data.sampler import GlobalBatchSampler
    from mcd_scale.model.flops import train_flops_per_token
    from mcd_scale.training.trainer import Trainer, step_batches

    trainer = Trainer(cfg, ctx.dims)
    sampler = GlobalBatchSampler(len(trainer.train_set), cfg.parallel.global_batch, cfg.train.seed)
    loader = MicroBatchLoader(trainer.train_set, sampler, ctx.dims.dp_rank, ctx.dims.dp, cfg.parallel.micro_batch,
                              start_step=0, num_workers=0)
    batches = step_batches(loader)
    seconds, losses = [], []
    for step in range(steps):
        micro = next(batches)
        prepared = (trainer.objective.prepare(m, step) for m in micro)  # lazily, as Trainer.fit does
        t0 = time.perf_counter()
        loss, skipped, _ = trainer.engine.train_step(prepared, n_micro=len(micro))
        if step > 0:
            seconds.append(time.perf_counter() - t0)
        losses.append(loss)
        if skipped:
            break
    trainer.logger.close()
    step_s = sorted(seconds)[len(seconds) // 2] if seconds else None
    tokens = cfg.parallel.global_batch * cfg.model.seq_len
    tps = tokens / step_s if step_s else None
    tflops = train_flops_per_token(cfg.model) * tps / ctx.world / 1e12 if tps else None
    finite = all(v == v and abs(v) != float("inf") for v in losses)
    release(trainer)
    return {"ok": finite and len(losses) == steps, "step_s": step_s, "tokens_per_s": tps, "tflops": tflops}


def release(trainer) -> None:
    """Free a Trainer's engine for the next row: DeepSpeed keeps every engine's module in a global list and its
    hooks' closures hold the optimizer state, so ``del`` frees nothing on a GPU; ``destroy()`` drops them."""
    import gc

    import torch

    engine = getattr(getattr(trainer, "engine", None), "engine", None)
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    trainer.engine = trainer.objective = trainer.ema = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_step_time(ctx: Ctx) -> dict:
    """Training-step time of the 1B model (tiny with --tiny) over micro-batch sizes x activation checkpointing."""
    import gc

    import torch

    from mcd_scale.parallel.memory_plan import memory_plan

    files = ["configs/tiny/teacher.yaml"] if ctx.args.tiny else ["configs/teacher_1b.yaml"]
    model = TINY_MODEL if ctx.args.tiny else []
    tokens = ctx.tokens
    if not ctx.args.tiny:  # the 1B shapes (vocab 50257, 1024 tokens) need their own token shards
        tokens = os.path.join(ctx.root, "tokens_1b")
        make_tokens(ctx, load(files, ctx.common("tokens_1b")), tokens)
    peak_name = next((k for k in PEAK_BF16_TFLOPS if k in ctx.gpu_name), None)
    peak = PEAK_BF16_TFLOPS.get(peak_name) if peak_name else None
    mbs = ctx.args.micro_batches or ([2] if ctx.args.tiny else [4, 8, 16])
    steps = max(ctx.args.steps, 3)
    rows, ok = [], True
    for mb in mbs:
        for ckpt in (False, True):
            name = f"step_mb{mb}_{'ckpt' if ckpt else 'nockpt'}"
            over = model + ctx.common(name) + [
                f"data.path={tokens}", "parallel.zero_stage=3", f"parallel.micro_batch={mb}",
                f"parallel.global_batch={mb * ctx.world}", f"parallel.activation_checkpointing={str(ckpt).lower()}",
                "checkpoint.every=0"]
            cfg = load(files, over)
            if ctx.cuda:
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(ctx.device)
            t_row = time.perf_counter()
            try:
                res = timed_steps(ctx, cfg, steps)
            except Exception as exc:  # one configuration's failure (e.g. out of memory) is its own row
                res = {"ok": False, "step_s": None, "tokens_per_s": None, "tflops": None,
                       "error": f"{type(exc).__name__}: {exc}"[:500]}
            row = {"micro_batch": mb, "activation_checkpointing": ckpt, "ok": res["ok"],
                   "step_s": round(res["step_s"], 5) if res["step_s"] else None,
                   "tokens_per_s": round(res["tokens_per_s"], 1) if res["tokens_per_s"] else None,
                   "tflops_per_device": round(res["tflops"], 3) if res["tflops"] is not None else None,
                   "mfu": round(res["tflops"] / peak, 4) if peak and res["tflops"] is not None else None}
            plan = memory_plan(cfg, ctx.world)  # the figures `train.py --dry-run` prints for this layout
            row["plan_total_bytes"] = int(plan["total_bytes"])
            row["plan_activations_bytes"] = int(plan["activations_with_checkpointing" if ckpt
                                                     else "activations_without_checkpointing"])
            if ctx.cuda:
                row["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(ctx.device))
                row["peak_over_plan"] = round(row["peak_memory_bytes"] / max(row["plan_total_bytes"], 1), 3)
            if "error" in res:
                row["error"] = res["error"]
            ok = ok and res["ok"]
            rows.append(row)
            emit(ctx.args, {"check": f"step_time/{name}", **row, "seconds": round(time.perf_counter() - t_row, 2)})
    return {"ok": ok, "model": files[0] + (" (tiny overrides)" if ctx.args.tiny else ""), "device": ctx.gpu_name,
            "peak_tflops": peak, "peak_name": f"{peak_name} SXM bf16 dense" if peak_name else None,
            "timed_steps_per_row": steps - 1, "rows": rows}


# ------------------------------------------------------------------------------------------------
# Driver


def run_checks(args, dims, root: str) -> list[dict]:
    ctx = Ctx(args, dims, root)
    make_tokens(ctx, load(["configs/tiny/teacher.yaml"], ctx.model + ctx.common("tokens")), ctx.tokens)
    plan: list[tuple[str, Callable[[], dict]]] = [
        ("teacher_tp_zero3", lambda: check_teacher(ctx, "tp_zero3")),
        ("teacher_3d", lambda: check_teacher(ctx, "3d")),
        ("precompute", lambda: check_precompute(ctx)),
        ("mcd_online", lambda: check_distill(ctx, "mcd_online", ["distill.teacher_mode=online"])),
        ("mcd_offline", lambda: check_distill(ctx, "mcd_offline", [
            "distill.teacher_mode=offline", f"data.trajectories={os.path.join(root, 'traj')}"])),
        ("sdtt", lambda: check_distill(ctx, "sdtt", ["train.objective=sdtt", "distill.teacher_mode=online"])),
        ("sampling", lambda: check_sampling(ctx)),
        ("bf16_vs_fp32", lambda: check_bf16(ctx)),
        ("step_time", lambda: check_step_time(ctx)),
    ]
    rows = []
    for name, fn in plan:
        if args.rows and name not in args.rows:
            continue
        t0 = time.perf_counter()
        try:
            with row_budget(args.row_budget_s, name):
                row = fn()
        except Exception as exc:  # one failed check is a row, not the end of the report
            row = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                   "where": traceback.format_exc(limit=-3).strip().splitlines()[-3:]}
        row = {"check": name, **row, "seconds": round(time.perf_counter() - t0, 2)}
        emit(args, row)
        rows.append(row)
    return rows


class RowOverBudget(Exception):
    """A row ran past --row-budget-s (SIGALRM in the main thread)."""


@contextlib.contextmanager
def row_budget(seconds: float, name: str):
    """Raise :class:`RowOverBudget` in the row after ``seconds`` (the previous SIGALRM handler is restored)."""
    import signal

    def handler(signum, frame):
        raise RowOverBudget(f"row {name} ran past --row-budget-s {seconds:g}")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def emit(args, row: dict) -> None:
    """One JSON line on stdout (rank 0), flushed as soon as the row finishes, and appended to --out: rows already
    printed survive whatever stops the run later (a time limit, an out-of-memory kill)."""
    from mcd_scale.parallel import collectives

    if collectives.rank() != 0:
        return
    line = json.dumps(row, default=str)
    print(line, file=sys.__stdout__, flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def relaunch(args, argv: Sequence[str]) -> int:
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           os.path.abspath(__file__), *argv]
    return subprocess.call(cmd, env=dict(os.environ, MCD_GPU_CHECK_LAUNCHED="1"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    missing = missing_packages()
    if missing:
        print(f"gpu_check: error: missing packages {', '.join(missing)}; install the carried wheels "
              f"(bash tools/gpu_check.sh does it from .whl/)", file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo and host tensors even on a GPU machine
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: --device cuda: CUDA is not available on this machine; use --device cpu --tiny",
              file=sys.stderr)
        return 2
    if args.nproc < 1 or (args.nproc > 1 and torch.cuda.is_available() and args.nproc > torch.cuda.device_count()):
        print(f"gpu_check: error: --nproc {args.nproc}: need 1..{max(torch.cuda.device_count(), 1)} "
              f"(one rank per GPU)", file=sys.stderr)
        return 2
    if args.nproc > 1 and "RANK" not in os.environ:
        return relaunch(args, argv)

    from mcd_scale.parallel import collectives
    from mcd_scale.parallel.distributed import init_distributed, shutdown

    # Everything but the JSON goes to stderr (DeepSpeed's logger binds stdout when first imported,
    # the trainer and tools print console lines): stdout carries only the report.
    with contextlib.redirect_stdout(sys.stderr):
        dims = init_distributed(1, 1)
        root = tempfile.mkdtemp(prefix="mcd_gpu_check_", dir=args.keep) if collectives.rank() == 0 else None
        root = collectives.broadcast_object(root, src=0)  # one shared run directory (rank 0's)
        t0 = time.perf_counter()
        try:
            rows = run_checks(args, dims, root)
        finally:
            collectives.barrier()
            if not args.keep and collectives.rank() == 0:
                shutil.rmtree(root, ignore_errors=True)
    report = {"summary": True, "device": str(dims.device), "device_name": torch.cuda.get_device_name(dims.device)
              if dims.device.type == "cuda" else "cpu", "world_size": dims.world_size, "tiny": args.tiny,
              "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1),
              "ok": all(r["ok"] for r in rows), "rows": len(rows), "failed": [r["check"] for r in rows if not r["ok"]]}
    emit(args, report)
    shutdown()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
