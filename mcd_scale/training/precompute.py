"""Precompute one distillation round's coupled trajectories + frozen-teacher top-k targets (docs/method.md §6).

    python tools/precompute_trajectories.py --teacher runs/tiny_teacher --data data/prepared --out traj/r0
    torchrun --nproc_per_node 8 tools/precompute_trajectories.py --teacher ... --data ... --out ...
    deepspeed --num_gpus 8 tools/precompute_trajectories.py ...      # also srun / mpirun

Inference only. Per sample id g of the token train split (round n, seed = train.seed):
t = t_min + (1 - t_min) U with U from keyed_generator("traj-time", seed, n, g); (t, s) =
coupled_times(t, dt_n) (or the sampler's grid step with distill.times: grid, mcd_scale/distill/rounds.py
round_times); u = reveal_thresholds(g, L, seed, duality_form, K=V+1, round_idx=n), banded by
distill.reveal_order (mcd_scale/distill/reveal_order.py);
(z_t, z_s) = coupled_pair(x, t, s, u); the teacher (built on this rank's TP shard from the
consolidated weights) runs on z_s; the top-k log-probs at temperature tau_n at the positions masked
at s are packed with pack_sample. Output: OUT/train/shard-JJJJJJ.tar + OUT/manifest.json
(format: docs/trajectories.md, reader: mcd_scale/data/trajectories.py).

Work split: shard j holds ids [j*S, (j+1)*S) whatever the rank count; data-parallel replica r writes
the shards j = r (mod dp); the TP ranks of a replica compute together and tp_rank 0 writes. Each
shard is written to a temp name, renamed, then a sidecar ``shard-JJJJJJ.done.json`` (size, sha256)
is written: a restarted job skips every shard whose sidecar verifies and recomputes the rest.
Rank 0 writes the manifest last, after checking every id 0..N-1 is in exactly one shard.

Errors in the inputs (missing teacher/config, data manifest mismatch, an --out of another run) exit
with code 2 on every rank. Fault injection for tests: MCD_FAULT_EXIT_AFTER_SHARDS=n makes a rank
``os._exit(9)`` right after it has written n shards.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence


import numpy as np
import torch
from tqdm import tqdm

from mcd_scale.data.manifest import (ManifestError, dumps_manifest, load_manifest, manifest_path,
                                     sha256_file, write_manifest)
from mcd_scale.errors import EXIT_CONFIG, EXIT_OK, EXIT_PREEMPTED
from mcd_scale.signals import PreemptionFlag, run_entry
from mcd_scale.data.trajectories import (THRESHOLD_PURPOSE, TIME_PURPOSE, TRAJ_FORMAT,
                                         TRAJ_FORMAT_VERSION, sample_time, threshold_K,
                                         thresholds_for)
from mcd_scale.cli import (ArgumentParser, add_config_args, add_out_arg, add_quiet_arg, debug, input_error_types,
                           rank_prefix)
from mcd_scale.config import ConfigError, load_config
from mcd_scale.data.loader import open_prepared
from mcd_scale.data.shards import write_shards
from mcd_scale.diffusion.schedules import get_schedule
from mcd_scale.distill.checkpoints import resolve_teacher_file, teacher_digest
from mcd_scale.distill.disk_plan import (free_bytes, human, round_samples, trajectory_round_bytes,
                                         trajectory_sample_bytes)
from mcd_scale.distill.rounds import round_dt, round_temperature, round_times
from mcd_scale.distill.targets import pack_batch, topk_from_logits
from mcd_scale.parallel import collectives
from mcd_scale.parallel.distributed import detect_launch_env, init_distributed, shutdown
from mcd_scale.training.faults import pause_for_preemption, signal_self_after_work

TOOL_VERSION = "1"
PARAMS_NAME = "precompute.json"  # the run's parameters, written on first start; a resume must match
SHARD_PREFIX = "shard"
FAULT_ENV = "MCD_FAULT_EXIT_AFTER_SHARDS"


class PrecomputeError(Exception):
    """Bad inputs: printed as one line, exit code 2 on every rank."""


# ----------------------------------------------------------------------------------------------
# Inputs


def find_teacher_config(teacher_file: str) -> str:
    """config.resolved.yaml next to the teacher weights (checkpoint dir, checkpoints root, run dir)."""
    here = os.path.dirname(os.path.abspath(teacher_file))
    looked = []
    for d in (here, os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        path = os.path.join(d, "config.resolved.yaml")
        looked.append(path)
        if os.path.isfile(path):
            return path
    raise PrecomputeError(f"no --config given and no config.resolved.yaml next to the teacher (looked at "
                          f"{', '.join(looked)}); pass --config with the teacher's model config")


def load_inputs(args) -> tuple:
    """(cfg, teacher_file, teacher_digest, train dataset, token manifest, config files). Pure reads,
    identical on every rank, so every rank fails the same way before any collective."""
    try:
        teacher_file = resolve_teacher_file(args.teacher, what="--teacher")
    except (FileNotFoundError, ValueError) as exc:
        raise PrecomputeError(str(exc)) from None
    files = list(args.config) if args.config else [find_teacher_config(teacher_file)]
    overrides = list(args.overrides)
    if args.round is not None:
        overrides.append(f"distill.round={args.round}")
    try:
        cfg = load_config(files, overrides)
    except ConfigError as exc:
        raise PrecomputeError(f"config ({', '.join(files)}): {exc}") from None
    if cfg.distill.round < 0:
        raise PrecomputeError(f"--round must be >= 0, got {cfg.distill.round}")
    try:
        tokens = load_manifest(args.data)
        train = open_prepared(args.data, "train", vocab_size=cfg.model.vocab_size, seq_len=cfg.model.seq_len)
    except (ManifestError, OSError) as exc:
        raise PrecomputeError(f"--data: {exc}") from None
    except Exception as exc:  # ShardError and friends: name them, exit 2
        raise PrecomputeError(f"--data: {type(exc).__name__}: {exc}") from None
    return cfg, teacher_file, teacher_digest(teacher_file), train, tokens, files


def run_params(args, cfg, teacher_file: str, digest: str, tokens: dict, num_samples: int, S: int) -> dict:
    """Everything that determines the payloads (the manifest minus the shard list)."""
    n = cfg.distill.round
    seed = cfg.train.seed
    dt = round_dt(cfg.distill, n)
    if not 0.0 < dt <= 1.0 - cfg.diffusion.t_min:
        raise PrecomputeError(f"round {n}: dt = {dt} does not fit in [t_min, 1] (distill.dt0={cfg.distill.dt0}, "
                              f"dt_growth={cfg.distill.dt_growth}); lower --round or distill.dt0")
    if not 1 <= cfg.distill.top_k <= cfg.model.vocab_size:
        raise PrecomputeError(f"distill.top_k = {cfg.distill.top_k} must be in [1, model.vocab_size = "
                              f"{cfg.model.vocab_size}]")
    form = cfg.diffusion.duality_form
    return {
        "format": TRAJ_FORMAT, "format_version": TRAJ_FORMAT_VERSION,
        "tool": "tools/precompute_trajectories.py", "tool_version": TOOL_VERSION,
        "teacher": {"path": os.path.abspath(teacher_file), "sha256": digest},
        "source": {"path": os.path.abspath(args.data), "split": "train",
                   "manifest_sha256": sha256_file(manifest_path(args.data)),
                   "tokenizer_sha256": tokens.get("tokenizer", {}).get("sha256"),
                   "num_samples": int(tokens["splits"]["train"]["num_samples"])},
        "vocab_size": cfg.model.vocab_size, "mask_id": cfg.model.mask_id, "seq_len": cfg.model.seq_len,
        "dtype": tokens.get("dtype"),
        "schedule": cfg.diffusion.schedule, "eps": cfg.diffusion.eps, "t_min": cfg.diffusion.t_min,
        "duality_form": form, "seed": seed, "round": n, "dt": dt,
        "temperature": round_temperature(cfg.distill, n), "top_k": cfg.distill.top_k,
        "thresholds": {"purpose": THRESHOLD_PURPOSE, "seed": seed, "form": form,
                       "K": threshold_K(cfg.model.vocab_size), "round_idx": n,
                       **({"order": "strided", "stride": cfg.distill.reveal_stride}
                          if cfg.distill.reveal_order == "strided" else {})},
        "times": ({"purpose": TIME_PURPOSE, "ids": "(seed, round, sample_id)",
                   "rule": "t = t_min + (1 - t_min) * U; (t, s) = coupled_times(t, dt, t_min)"}
                  if cfg.distill.times == "uniform" else
                  {"purpose": TIME_PURPOSE, "ids": "(seed, round, sample_id)", "mode": "grid",
                   "rule": "t = t_min + (1 - t_min) * U; (t, s) = grid_times(t, dt, t_min)"}),
        "num_samples": num_samples, "samples_per_shard": S,
        "fields": {"ids": "clean tokens [L]", "times": "float64 (t, s)", "topk_pos": "positions masked at s",
                   "topk_ids": "[n, k]", "topk_logp": "float16 [n, k]", "tail_logp": "float32 [n]"},
    }


_PATH_FIELDS = {("teacher", "path"), ("source", "path")}  # may legitimately change between restarts


def check_resume_params(out: str, params: dict) -> None:
    """Refuse to resume into an --out made with other parameters (names the field)."""
    path = os.path.join(out, PARAMS_NAME)
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise PrecomputeError(f"{path} is unreadable ({exc}); delete --out {out} and start again") from None

    first = ("round", "seed", "teacher", "source", "num_samples", "samples_per_shard")

    def walk(a, b, prefix=()):
        keys = sorted(set(a) | set(b), key=lambda k: (k not in first, first.index(k) if k in first else 0, k))
        for key in keys:
            here = prefix + (key,)
            if here in _PATH_FIELDS:
                continue
            va, vb = a.get(key), b.get(key)
            if isinstance(va, dict) and isinstance(vb, dict):
                walk(va, vb, here)
            elif va != vb:
                raise PrecomputeError(f"--out {out} holds a run with {'.'.join(here)} = {va!r}, this run has {vb!r} "
                                      f"({path}); resume with the same inputs, or use a fresh --out")
    walk(old, params)


# ----------------------------------------------------------------------------------------------
# Compute


def shard_name(j: int) -> str:
    return f"{SHARD_PREFIX}-{j:06d}.tar"


def sidecar_path(split_dir: str, j: int) -> str:
    return os.path.join(split_dir, f"{SHARD_PREFIX}-{j:06d}.done.json")


def shard_complete(split_dir: str, j: int, first: int, last: int) -> Optional[dict]:
    """The shard's record if its sidecar exists and the tar matches it (size and sha256), else None."""
    side = sidecar_path(split_dir, j)
    tar = os.path.join(split_dir, shard_name(j))
    if not (os.path.isfile(side) and os.path.isfile(tar)):
        return None
    try:
        with open(side, encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("name") != shard_name(j) or rec.get("first_id") != first or rec.get("last_id") != last \
            or rec.get("num_samples") != last - first + 1 or os.path.getsize(tar) != rec.get("bytes") \
            or sha256_file(tar) != rec.get("sha256"):
        return None
    index = os.path.join(split_dir, str(rec.get("index", "")))  # the shard's sample index (a sidecar)
    if "index" not in rec or not os.path.isfile(index) or sha256_file(index) != rec.get("index_sha256"):
        return None
    return rec


def trajectory_batch(model, cfg, params: dict, x: torch.Tensor, gids: torch.Tensor, dims) -> list[dict]:
    """Payloads (without ids) of one batch: times + packed top-k targets.

    Times and thresholds are drawn on the host (keyed CPU generators: the same on any rank or device);
    z_s and s move to the teacher's device once; the vocab gather, the log-softmax and the top-k run
    there, and only the packed top-k (bytes per sample proportional to k, not V) comes back
    (:func:`mcd_scale.distill.targets.pack_batch`)."""
    # lazy: loads megatron, scipy; importing this module does not need them
    from mcd_scale.diffusion.duality import coupled_pair
    from mcd_scale.model.tp_layers import gather_vocab_logits

    seed, n, t_min, V = params["seed"], params["round"], params["t_min"], params["vocab_size"]
    t_raw = torch.tensor([sample_time(seed, n, int(g), t_min) for g in gids.tolist()], dtype=torch.float64)
    t, s = round_times(t_raw, params["dt"], t_min, params["times"].get("mode", "uniform"))
    u = thresholds_for(gids, params)  # the reader regenerates exactly these (mcd_scale/data/trajectories.py)
    schedule = get_schedule(params["schedule"], params["eps"])
    _, z_s = coupled_pair(x, t, s, u, schedule, params["mask_id"])
    dev = next(model.parameters()).device
    z_dev = z_s.to(dev, non_blocking=True)
    logits = model(z_dev, s.to(device=dev, dtype=torch.float32))
    logits = gather_vocab_logits(logits, dims.tp, dims.tp_group)
    targets = topk_from_logits(logits, z_dev, V, params["top_k"], params["temperature"])
    out = pack_batch(targets)
    times = np.stack([t.numpy(), s.numpy()], axis=1).astype(np.float64)
    for b, rec in enumerate(out):
        rec["times"] = times[b].copy()
    return out


def compute_shard(model, cfg, params, train, dims, split_dir: str, j: int, first: int, last: int,
                  batch_size: int, progress) -> dict:
    def samples():
        for lo in range(first, last + 1, batch_size):
            hi = min(lo + batch_size, last + 1)
            gids = torch.arange(lo, hi, dtype=torch.int64)
            raw = [train[g] for g in range(lo, hi)]
            if any(r is None for r in raw):
                raise PrecomputeError(f"token sample {lo + [r is None for r in raw].index(True)} is unreadable")
            x = torch.from_numpy(np.stack([r["ids"] for r in raw]).astype(np.int64))
            payloads = trajectory_batch(model, cfg, params, x, gids, dims)
            for g, r, p in zip(range(lo, hi), raw, payloads):
                p["ids"] = r["ids"]
                yield g, p
            if progress is not None:
                progress.update(hi - lo)

    records = write_shards(split_dir, samples(), last - first + 1, prefix=SHARD_PREFIX, first_shard=j)
    if len(records) != 1:
        raise RuntimeError(f"shard {j}: write_shards produced {len(records)} shards")
    rec = records[0]
    tmp = sidecar_path(split_dir, j) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(rec, fh, sort_keys=True)
    os.replace(tmp, sidecar_path(split_dir, j))
    return rec


def collect_shards(split_dir: str, num_shards: int, N: int, S: int) -> list[dict]:
    """Rank 0, after the barrier: every shard's verified record; ids 0..N-1 exactly once, in order."""
    records, next_id = [], 0
    for j in range(num_shards):
        side = sidecar_path(split_dir, j)
        if not os.path.isfile(side):
            raise PrecomputeError(f"shard {shard_name(j)} has no sidecar {side}: it was not finished")
        with open(side, encoding="utf-8") as fh:
            rec = json.load(fh)
        tar = os.path.join(split_dir, rec["name"])
        if not os.path.isfile(tar) or os.path.getsize(tar) != rec["bytes"]:
            raise PrecomputeError(f"shard {tar} is missing or its size differs from {side}; re-run to redo it")
        if rec["first_id"] != next_id or rec["last_id"] != min((j + 1) * S, N) - 1:
            raise PrecomputeError(f"shard {tar} covers ids {rec['first_id']}..{rec['last_id']}, expected "
                                  f"{next_id}..{min((j + 1) * S, N) - 1} (gap or overlap)")
        next_id = rec["last_id"] + 1
        records.append(rec)
    if next_id != N:
        raise PrecomputeError(f"shards cover ids 0..{next_id - 1}, expected 0..{N - 1}")
    return records


class Preempted(Exception):
    """SIGUSR1/SIGTERM seen by some rank; all ranks stop at the same shard boundary (exit 4, requeue)."""


def _agree(ok: bool) -> bool:
    """True on every rank iff every rank is ok."""
    return not collectives.any_rank(not ok)


def round_limit(limit: Optional[str], cfg, available: int) -> int:
    """Samples to precompute: ``--limit N``, ``--limit all`` (the whole split), or by default what the round
    reads (``distill.steps_per_round x parallel.global_batch``; the distillation job reads no further)."""
    if limit is None:
        want = round_samples(cfg)
    elif str(limit).lower() == "all":
        want = available
    else:
        try:
            want = int(limit)
        except ValueError:
            raise PrecomputeError(f"--limit {limit!r}: expected a sample count or 'all'") from None
    n = min(want, available)
    if n < 1:
        raise PrecomputeError(f"nothing to do: the train split has {available} samples, --limit {limit}")
    return n


def dry_run(args, cfg, N: int, S: int, available: int) -> dict:
    """The round's trajectory bytes against the free space of --out's file system; PrecomputeError (exit 2)
    when it does not fit. Nothing is written or launched."""
    existing = 0
    split_dir = os.path.join(args.out, "train")
    if os.path.isdir(split_dir):  # a resumed round: its finished shards stay
        existing = sum(os.path.getsize(os.path.join(split_dir, f)) for f in os.listdir(split_dir))
    need = trajectory_round_bytes(cfg, N, S, cfg.distill.round)
    free, measured = free_bytes(args.out)
    plan = {"round": cfg.distill.round, "samples": N, "round_reads": round_samples(cfg), "train_split": available,
            "bytes_per_sample": trajectory_sample_bytes(cfg, cfg.distill.round), "bytes_per_round": need,
            "bytes_already_written": existing, "free_bytes": free, "file_system_of": measured,
            "fits": need - existing <= free}
    if not plan["fits"]:
        raise PrecomputeError(f"--out {args.out}: round {cfg.distill.round} needs ~{human(need - existing)} of "
                              f"trajectories ({N} samples x ~{human(plan['bytes_per_sample'])}, an estimate) but "
                              f"{measured} has {human(free)} free; free space, choose another --out or lower --limit")
    return {"dry_run": plan, "rank": 0}


def precompute(args, preempt: Optional[PreemptionFlag] = None) -> dict:
    """One round's trajectory set (module docstring). ``preempt``: the caller's preemption flag, installed for
    longer than this call (the entry point's, for the process's lifetime); without one, a flag is installed for
    the shard loop only and the previous handlers are put back after it."""
    # lazy: loads megatron; importing this module does not need it
    from mcd_scale.model.build import build_model
    from mcd_scale.model.weights import load_full_state_dict, load_safetensors

    cfg, teacher_file, digest, train, tokens, _files = load_inputs(args)
    N = round_limit(args.limit, cfg, len(train))
    S = args.samples_per_shard
    if S < 1 or args.batch_size < 1:
        raise PrecomputeError(f"--samples-per-shard and --batch-size must be >= 1 (got {S}, {args.batch_size})")
    params = run_params(args, cfg, teacher_file, digest, tokens, N, S)
    if args.dry_run:
        return dry_run(args, cfg, N, S, len(train))
    check_resume_params(args.out, params)
    state = load_safetensors(teacher_file)

    tp = cfg.parallel.tp
    world = detect_launch_env().world_size
    m = cfg.model
    if world % tp or m.heads % tp or m.ffn_hidden % tp or m.padded_vocab % tp:
        raise PrecomputeError(f"parallel.tp = {tp} must divide the {world} launched rank(s), model.heads ({m.heads}), "
                              f"model.ffn_hidden ({m.ffn_hidden}) and the padded vocabulary ({m.padded_vocab}); the "
                              f"teacher's weights are layout-independent, so pass e.g. --set parallel.tp=1")
    dims = init_distributed(tp, 1)
    rank = collectives.rank()
    ok, err = True, ""
    split_dir = os.path.join(args.out, "train")
    if rank == 0:
        try:
            os.makedirs(split_dir, exist_ok=True)
            if os.path.exists(manifest_path(args.out)):
                os.remove(manifest_path(args.out))  # the manifest marks a finished set: not any more
            with open(os.path.join(args.out, PARAMS_NAME) + ".tmp", "w", encoding="utf-8") as fh:
                fh.write(dumps_manifest(params))
            os.replace(os.path.join(args.out, PARAMS_NAME) + ".tmp", os.path.join(args.out, PARAMS_NAME))
        except OSError as exc:
            ok, err = False, f"--out {args.out}: {exc}"
    if not _agree(ok):
        raise PrecomputeError(err or "rank 0 could not prepare --out (see its log)")

    # The teacher lives on this rank's device (cuda:LOCAL_RANK under NCCL): the weights are copied
    # from the host state straight into the device parameters of this TP shard.
    model = build_model(cfg, dims, init=False).to(dims.device)
    load_full_state_dict(model, state, dims)
    del state
    model.eval()

    num_shards = -(-N // S)
    mine = [j for j in range(num_shards) if j % dims.dp == dims.dp_rank]
    writer = dims.tp_rank == 0
    fault = int(os.environ.get(FAULT_ENV, "0") or 0)
    todo, skipped = [], 0
    for j in mine:
        first, last = j * S, min((j + 1) * S, N) - 1
        if shard_complete(split_dir, j, first, last) is not None:
            skipped += 1
        else:
            todo.append((j, first, last))
    # TP peers must agree on the work list (the writer's view decides).
    if dims.tp > 1:
        todo = collectives.broadcast_object(todo, src=dims.rank_of(0, dims.dp_rank, 0), group=dims.tp_group)
    progress = None
    if rank == 0:
        progress = tqdm(total=sum(last - first + 1 for _, first, last in todo), unit="sample",
                        desc=f"round {params['round']} rank0 (dp={dims.dp})", disable=args.no_progress,
                        file=sys.stderr)
    t0 = time.perf_counter()
    done = 0
    written = 0
    # Preemption (SIGUSR1/SIGTERM, e.g. SLURM's --signal): finish the current shard, agree at the shard
    # boundary, exit 4. DP ranks may own different numbers of shards: every rank takes part in the same
    # number of boundary agreements (the longest work list), idle ranks just vote.
    # The handlers only set a flag, so they are put back when this loop ends, however it ends (a handler left
    # behind would make the process immune to SIGTERM afterwards: a caller's timeout could not stop it).
    own_flag = preempt is None
    if own_flag:
        preempt = PreemptionFlag()
    try:
        rounds = int(collectives.all_reduce(torch.tensor([float(len(todo))], dtype=torch.float64, device=dims.device),
                                             op="max").item())
        pause_after = int(os.environ.get("MCD_FAULT_PAUSE_AFTER_SHARDS", "0") or 0)
        with torch.no_grad():
            for i in range(rounds):
                if collectives.any_rank(preempt.requested):
                    raise Preempted(f"preemption signal: stopped after {written} shard(s) of this rank; rerun to resume")
                if i >= len(todo):
                    continue
                j, first, last = todo[i]
                if writer:
                    compute_shard(model, cfg, params, train, dims, split_dir, j, first, last, args.batch_size, progress)
                    written += 1
                    if fault and written >= fault:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(9)
                else:  # a TP peer: same forward passes, nothing written
                    for lo in range(first, last + 1, args.batch_size):
                        hi = min(lo + args.batch_size, last + 1)
                        x = torch.from_numpy(np.stack([train[g]["ids"] for g in range(lo, hi)]).astype(np.int64))
                        trajectory_batch(model, cfg, params, x, torch.arange(lo, hi), dims)
                done += last - first + 1
                if pause_after and rank == 0 and i + 1 == pause_after:
                    pause_for_preemption(f"precompute-shard{pause_after}")
            if collectives.any_rank(preempt.requested):
                raise Preempted(f"preemption signal: stopped after {written} shard(s) of this rank; rerun to resume")
    finally:
        if own_flag:
            preempt.restore()
    elapsed = time.perf_counter() - t0
    if progress is not None:
        progress.close()
    rate = collectives.all_reduce(torch.tensor([float(done) if writer else 0.0], dtype=torch.float64))
    collectives.barrier()

    ok, err, manifest = True, "", None
    if rank == 0:
        try:
            records = collect_shards(split_dir, num_shards, N, S)
            manifest = dict(params)
            manifest["splits"] = {"train": {"dir": "train", "num_samples": N, "shards": records}}
            write_manifest(args.out, manifest)
        except PrecomputeError as exc:
            ok, err = False, str(exc)
    if not _agree(ok):
        raise PrecomputeError(err or "rank 0 could not verify the shards (see its log)")
    total = float(rate.item())
    return {"manifest": manifest, "computed": int(total), "skipped_shards": skipped, "seconds": elapsed,
            "samples_per_s": total / elapsed if elapsed > 0 else 0.0, "rank": rank, "num_shards": num_shards}


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="tools/precompute_trajectories.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher run dir, checkpoint dir or model.safetensors")
    ap.add_argument("--data", required=True, metavar="DIR",
                    help="prepared token directory (tools/prepare_data.py --out)")
    add_out_arg(ap, required=True, help="output directory (resumable)", aliases=())
    ap.add_argument("--round", type=int, default=None, help="distillation round (default: distill.round)")
    ap.add_argument("--limit", default=None, metavar="N|all",
                    help="the first N train samples, or 'all' of the split (default: what the round reads, "
                         "distill.steps_per_round x parallel.global_batch)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the round's trajectory bytes (an estimate) and the free space of --out's file "
                         "system, refuse (exit 2) when it does not fit; nothing is written")
    add_config_args(ap, config_help="config YAML files, later override earlier (repeatable; default: "
                                    "config.resolved.yaml next to the teacher)")
    ap.add_argument("--samples-per-shard", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32, help="teacher forward batch per rank")
    add_quiet_arg(ap, dest="no_progress")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return ap


def main(argv: Optional[Sequence[str]] = None, process_entry: bool = False) -> int:
    """The tool: exit 0 (the set is complete), 2 (bad input), 4 (preempted: finished shards kept, rerun).

    The preemption handlers are installed here, before any work, not only around the shard loop: a rank that
    finishes its last shard and returns from :func:`precompute` before SLURM's warning signal reaches it would
    otherwise be killed by SIGUSR1's default action (exit 138, which no batch script requeues or accepts). A
    signal that arrives once the set is complete changes nothing (exit 0). As the process's entry point
    (``process_entry``, tools/precompute_trajectories.py) the handlers stay installed until the process exits;
    an in-process caller (the tests) gets its previous handlers back.
    """
    args = build_parser().parse_args(argv)
    return run_entry(lambda preempt: _run(args, preempt), process_entry)


def _run(args, preempt: PreemptionFlag) -> int:
    try:
        res = precompute(args, preempt)
        signal_self_after_work()
    except Preempted as exc:  # every rank agreed at a shard boundary: finished shards are kept
        print(f"precompute_trajectories: {exc}", file=sys.stderr, flush=True)
        shutdown()
        return EXIT_PREEMPTED
    except (PrecomputeError, *input_error_types()) as exc:  # a truncated/altered teacher file is one too
        if debug():  # MCD_DEBUG=1: the traceback too
            raise
        print(f"{rank_prefix()}precompute_trajectories: error: {' '.join(str(exc).split())}", file=sys.stderr,
              flush=True)
        shutdown(drain=False)
        return EXIT_CONFIG
    if preempt.requested:  # after the last boundary: the work is done, nothing to save or rerun
        print(f"{rank_prefix()}precompute_trajectories: preemption signal after the set was complete; exit 0",
              file=sys.stderr, flush=True)
    if "dry_run" in res:
        print(json.dumps(res["dry_run"], indent=2), flush=True)
        return EXIT_OK
    if res["rank"] == 0:
        print(f"precompute_trajectories: {res['manifest']['num_samples']} samples in {res['num_shards']} shards -> "
              f"{args.out} (computed {res['computed']}, {res['skipped_shards']} shard(s) of rank 0 resumed; "
              f"{res['samples_per_s']:.1f} samples/s)", flush=True)
    shutdown()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(process_entry=True))
