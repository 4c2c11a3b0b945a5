#!/usr/bin/env python
"""Experiment: a few-step student that sees the coupled sampler's noise (a consistency map), on the exact benchmark.

Why (docs/results.md, "Where the gap comes from"): the 256-vs-16-step gap on the synthetic chain is made of
tokens revealed in the same step being drawn independently. Any factorised student that predicts a token
from z_t alone, trained by cross-entropy, learns a marginal and cannot coordinate tokens it reveals together
(MCD's and the reveal-aware students' ceiling). The deterministic coupled sampler (docs/method.md §7) removes that
limit for a student that is given the sampler's noise: teacher@256 with per-token thresholds u and Gumbel
noise g is a deterministic map (u, g) -> x, and its state at time t is exactly ``where(u < alpha_t, x, m)``
(revealed tokens never change). So the 16-step student can be trained to reproduce, for tokens revealed in
one of its steps, the teacher's 256-step values *given the same noise*: a deterministic target, no marginal
averaging, and a student that matches it samples exactly teacher@256's law. This is consistency
distillation proper (a map from noise to data), not MCD as docs/method.md §5 defines it: the student's interface
adds g (and the order of reveals within a step) for the positions its step reveals.

Student = the teacher network (initialised from it) plus, for positions revealed in the current step, an
input embedding of (a reveal flag, a zero-initialised linear map of their Gumbel vector, a zero-initialised
embedding of their fine-step order within the step); optionally ``--extra-layers`` blocks appended with
zero output projections (identity at init). Its value for a revealed token is ``argmax(logits + g)``, so
at initialisation it is exactly teacher@16 with the coupled sampler. Loss: cross-entropy of
``softmax(logits + g)`` against teacher@256's token, over the revealed positions.

Result (negative; docs/results.md, "Students that see the order of reveals within a step"): no
generalisation in the minutes this machine allows.

Stages (one process, CPU):
  ``--make-pool N``: N teacher@256 coupled samples with seed ``--pool-seed`` (chunks of 128, resumable);
  training on pool trajectories; evaluation at ``--seed`` (never a pool seed): true NLL, entropy, gap closed
  against the ``--teacher-report`` curves (ancestral sampler: same law as the coupled one), and the share
  of tokens equal to teacher@256's under the same noise.

    .venv/bin/python tools/experiments/noise_conditioned.py --teacher /tmp/xt/teacher \
        --chain runs/demo/data/synthetic/chain.json --teacher-report /tmp/xt/eval_v2/report.json \
        --pool /tmp/nc/pool --make-pool 1536 --out /tmp/nc/run1
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from sample import load_model  # noqa: E402

from mcd_scale.diffusion.sampling import coupled_sample, sampling_times, token_gumbel_rows  # noqa: E402
from mcd_scale.diffusion.schedules import get_schedule  # noqa: E402
from mcd_scale.eval.synthetic import MarkovChain2  # noqa: E402

from chain_scores import score_row, teacher_curves  # noqa: E402
from mcd_scale.rng import keyed_generator  # noqa: E402

CHUNK = 128


def sampler_noise(seed: int, ids: list[int], seq_len: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The product coupled sampler's per-token thresholds u [B, L] and Gumbel noise g [B, L, V] (float64)."""
    u = torch.stack([torch.rand(seq_len, generator=keyed_generator("coupled-sample", seed, i), dtype=torch.float64)
                     for i in ids])
    g = torch.stack([token_gumbel_rows(seed, i, np.arange(seq_len), vocab_size, "coupled-gumbel") for i in ids])
    return u, g


class NoiseConditionedStudent(nn.Module):
    """The teacher's network plus noise inputs on the positions a step reveals (module docstring)."""

    def __init__(self, base: nn.Module, vocab_size: int, order_slots: int, extra_layers: int):
        super().__init__()
        self.base, self.V = base, vocab_size
        hidden = base.cfg.hidden
        self.reveal_flag = nn.Parameter(torch.zeros(hidden))
        self.noise_proj = nn.Linear(vocab_size, hidden, bias=False)
        self.order_embed = nn.Embedding(order_slots, hidden)
        nn.init.zeros_(self.noise_proj.weight)
        nn.init.zeros_(self.order_embed.weight)   # with reveal_flag = 0: a revealed position starts as a plain mask
        for _ in range(extra_layers):
            blk = copy.deepcopy(base.blocks[-1])    # trained norms and input projections: a sane start
            for out in (blk.attn.proj, blk.mlp.fc2):   # identity at init: nothing added to the residual stream
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)
            base.blocks.append(blk)

    def forward(self, z: torch.Tensor, reveal: torch.Tensor, g: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, V] (real tokens only). ``z`` has the mask id at every masked position (revealed ones too)."""
        b = self.base
        h = b.embed(z)
        # Gumbel(0,1) standardised (mean 0.5772, sd pi/sqrt(6)) so the zero-initialised map trains at a sane scale.
        g_std = ((g - 0.5772) / 1.2825).float()
        extra = self.reveal_flag + self.noise_proj(g_std) + self.order_embed(order)
        h = h + extra * reveal.unsqueeze(-1).float()
        for block in b.blocks:
            h = block(h, None)
        h = b.final(h, None)
        return b.head(h)[..., :self.V].float()


def fine_order(u: torch.Tensor, fine_alphas: torch.Tensor, k: torch.Tensor, ratio: int) -> torch.Tensor:
    """For each token, its fine-grid step (alpha_m <= u < alpha_{m+1}) minus the first fine step of coarse step k."""
    m = torch.searchsorted(fine_alphas.contiguous(), u.contiguous(), right=True) - 1   # alpha_m <= u
    return (m - (k.view(-1, 1) * ratio)).clamp(0, ratio - 1)


def reveal_steps(z: torch.Tensor, u: torch.Tensor, alphas: torch.Tensor, mask_id: int):
    """The coupled sampler's steps on ``alphas`` (one more entry than steps): yields (k, reveal [B, L], rows that
    reveal something). The caller fills ``z`` in place between steps; the last step reveals everything left."""
    steps = len(alphas) - 1
    for k in range(steps):
        masked = z == mask_id
        reveal = masked & (u < float(alphas[k + 1])) if k < steps - 1 else masked
        rows = reveal.any(dim=1).nonzero().flatten()
        if rows.numel():
            yield k, reveal, rows


def student_sample(student: NoiseConditionedStudent, seed: int, ids: list[int], seq_len: int, steps: int,
                   vocab_size: int, schedule, fine_steps: int) -> tuple[torch.Tensor, float, float]:
    """The coupled sampler with the student: at step k -> k+1 exactly the tokens with alpha_t <= u < alpha_s
    are revealed, each to argmax(student logits + g). Tokens left masked after the last step (u >= alpha(1e-5))
    are revealed with the last step too."""
    times = sampling_times(steps)
    alphas = schedule.alpha(times)
    fine_alphas = schedule.alpha(sampling_times(fine_steps))
    ratio = fine_steps // steps
    mask_id = vocab_size
    start, calls = time.perf_counter(), 0
    u, g = sampler_noise(seed, ids, seq_len, vocab_size)
    z = torch.full((len(ids), seq_len), mask_id, dtype=torch.long)
    with torch.no_grad():
        for k, reveal, rows in reveal_steps(z, u, alphas, mask_id):
            kk = torch.full((rows.numel(),), k, dtype=torch.long)
            order = fine_order(u[rows], fine_alphas, kk, ratio)
            logits = student(z[rows], reveal[rows], g[rows], order)
            calls += rows.numel()
            new = (logits.double() + g[rows]).argmax(-1)
            sub = z[rows]
            sub[reveal[rows]] = new[reveal[rows]]
            z[rows] = sub
    return z, calls / len(ids), time.perf_counter() - start


def make_pool(teacher, schedule, args) -> None:
    """Teacher@``fine_steps`` coupled samples, pool seed, sample ids [c*128, (c+1)*128) per chunk: the tokens
    (``chunk_XXXX.npy``) and the teacher's log-probabilities of each token at the fine step that revealed it
    (``lp_XXXX.npy``, float16). Chunks without a log-prob file are made again (deterministic: same tokens)."""
    os.makedirs(args.pool, exist_ok=True)
    n_chunks = math.ceil(args.make_pool / CHUNK)
    todo = [c for c in range(n_chunks) if not os.path.exists(os.path.join(args.pool, f"lp_{c:04d}.npy"))]
    todo.sort(key=lambda c: (os.path.exists(os.path.join(args.pool, f"chunk_{c:04d}.npy")), c))  # new ones first
    t0 = time.perf_counter()
    for done, c in enumerate(todo, 1):
        # The product sampler numbers samples from 0; _chunk_sample draws the same keyed noise for any ids.
        tokens, lp = _chunk_sample(teacher, schedule, args, list(range(c * CHUNK, (c + 1) * CHUNK)), keep_lp=True)
        for name, arr in ((f"chunk_{c:04d}.npy", tokens.numpy().astype(np.int16)),
                          (f"lp_{c:04d}.npy", lp.numpy().astype(np.float16))):
            path = os.path.join(args.pool, name)
            if name.startswith("chunk") and os.path.exists(path):
                if not np.array_equal(np.load(path), arr):
                    raise SystemExit(f"noise_conditioned.py: {path} differs from its regeneration")
                continue
            tmp = os.path.join(args.pool, ".tmp_" + name)
            np.save(tmp, arr)
            os.replace(tmp, path)
        el = time.perf_counter() - t0
        print(f"[pool] chunk {c} ({done}/{len(todo)}, {CHUNK} samples) {el / done:.1f} s/chunk, "
              f"eta {(len(todo) - done) * el / done:.0f}s", flush=True)


def _chunk_sample(teacher, schedule, args, ids: list[int], keep_lp: bool = False):
    """The product coupled sampler's output for sample ids ``ids`` (same keyed u and g; lazy rows); with
    ``keep_lp`` also the teacher's log-probs [n, L, V] at the step each token was revealed."""
    V, L, steps = teacher.vocab_size, teacher.seq_len, args.fine_steps
    times = sampling_times(steps)
    alphas = schedule.alpha(times)
    u, g = sampler_noise(args.pool_seed, ids, L, V)
    z = torch.full((len(ids), L), V, dtype=torch.long)
    lp_keep = torch.zeros(len(ids), L, V, dtype=torch.float32) if keep_lp else None
    with torch.no_grad():
        for lo in range(0, len(ids), args.pool_batch):
            sl = slice(lo, lo + args.pool_batch)
            zb, ub, gb = z[sl], u[sl], g[sl]
            for _, reveal, rows in reveal_steps(zb, ub, alphas, V):
                lp = torch.log_softmax(teacher.denoiser(zb[rows], torch.zeros(rows.numel()))[..., :V].double(), -1)
                new = (lp + gb[rows]).argmax(-1)
                sub = zb[rows]
                sub[reveal[rows]] = new[reveal[rows]]
                zb[rows] = sub
                if keep_lp:
                    idx = rows + lo
                    cur = lp_keep[idx]
                    cur[reveal[rows]] = lp[reveal[rows]].float()
                    lp_keep[idx] = cur
            z[sl] = zb
    return (z, lp_keep) if keep_lp else z


def load_pool(args, vocab_size: int, seq_len: int):
    """(x, u, g, lp) of every chunk that has both its token and log-prob files."""
    chunks = sorted(int(os.path.basename(f)[3:7]) for f in glob.glob(os.path.join(args.pool, "lp_*.npy")))
    chunks = [c for c in chunks if os.path.exists(os.path.join(args.pool, f"chunk_{c:04d}.npy"))]
    if not chunks:
        raise SystemExit(f"noise_conditioned.py: no complete chunk in {args.pool}; run with --make-pool N first")
    xs, us, gs, lps = [], [], [], []
    for c in chunks:
        u, g = sampler_noise(args.pool_seed, list(range(c * CHUNK, (c + 1) * CHUNK)), seq_len, vocab_size)
        xs.append(torch.from_numpy(np.load(os.path.join(args.pool, f"chunk_{c:04d}.npy")).astype(np.int64)))
        lps.append(torch.from_numpy(np.load(os.path.join(args.pool, f"lp_{c:04d}.npy"))))
        us.append(u)
        gs.append(g.float())   # float32 in memory: 1536 x 256 x 64 x 4 bytes = 100 MB
    return torch.cat(xs), torch.cat(us), torch.cat(gs), torch.cat(lps)


def batch_inputs(x, u, k, alphas, fine_alphas, ratio: int, grid_steps: int, mask_id: int):
    """(z_t, reveal, order) for trajectories x with thresholds u at coarse step k (the student's step)."""
    a_t, a_s = alphas[k].unsqueeze(1), alphas[k + 1].unsqueeze(1)
    masked = u >= a_t
    reveal = masked & (u < a_s)
    last = k == grid_steps - 1
    reveal[last] = masked[last]                     # the sampler's last step reveals everything left
    z_t = torch.where(masked, torch.full_like(x, mask_id), x)
    return z_t, reveal, fine_order(u, fine_alphas, k, ratio)


def validation_metrics(student, val, alphas, fine_alphas, ratio: int, grid_steps: int, mask_id: int) -> tuple:
    """On held-out trajectories, every coarse step of each, with the true z_t as input (no compounding): the
    share of revealed tokens whose argmax(logits + g) equals teacher@fine's, and the mean
    KL(teacher@fine at the token's reveal || student) over them."""
    x_all, u_all, g_all, lp_all = val
    hit = tot = 0
    kl_sum = 0.0
    student.eval()
    with torch.no_grad():
        for k_val in range(grid_steps):
            k = torch.full((x_all.shape[0],), k_val, dtype=torch.long)
            z_t, reveal, order = batch_inputs(x_all, u_all, k, alphas, fine_alphas, ratio, grid_steps, mask_id)
            logits = student(z_t, reveal, g_all.double(), order)
            pred = (logits + g_all).argmax(-1)
            hit += int((pred == x_all)[reveal].sum())
            tot += int(reveal.sum())
            lq = torch.log_softmax(logits[reveal], -1)
            lt = lp_all[reveal].float()
            kl_sum += float((lt.exp() * (lt - lq)).sum())
    return hit / max(tot, 1), kl_sum / max(tot, 1)


def train(student, pool, val, schedule, args, vocab_size: int) -> list[dict]:
    x_all, u_all, g_all, lp_all = pool
    n = x_all.shape[0]
    if args.freeze_base:  # train only what was added: the noise inputs and the extra blocks
        n_teacher_blocks = len(student.base.blocks) - args.extra_layers
        for name, p in student.base.named_parameters():
            if not name.startswith("blocks.") or int(name.split(".")[1]) < n_teacher_blocks:
                p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    print(f"[train] {sum(p.numel() for p in params)} trainable parameters", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    alphas = schedule.alpha(sampling_times(args.grid_steps))
    fine_alphas = schedule.alpha(sampling_times(args.fine_steps))
    ratio = args.fine_steps // args.grid_steps
    mask_id, B = vocab_size, args.batch
    log, start = [], time.perf_counter()
    val_args = (alphas, fine_alphas, ratio, args.grid_steps, mask_id)
    print("[val] step 0 accuracy %.4f kl %.4f" % validation_metrics(student, val, *val_args), flush=True)
    for i in range(args.steps):
        gen = keyed_generator("noise-conditioned-train", args.seed_train, i)
        idx = torch.randint(0, n, (B,), generator=gen)
        k = torch.randint(0, args.grid_steps, (B,), generator=gen)
        x, u, g, lp_t = x_all[idx], u_all[idx], g_all[idx].double(), lp_all[idx]
        z_t, reveal, order = batch_inputs(x, u, k, alphas, fine_alphas, ratio, args.grid_steps, mask_id)
        student.train()
        logits = student(z_t, reveal, g, order)
        scores = logits + g.float()
        # Sharpened softmax: the sampler's value is argmax(logits + g), and E_g softmax(logits + g) is flatter
        # than the Gumbel-max law softmax(logits), so at beta = 1 cross-entropy pulls every token's logits
        # sharper even where its argmax is already right. The pull shrinks as 1/beta (a margin loss).
        if args.target == "hard":
            loss = nn.functional.cross_entropy(scores[reveal] * args.beta, x[reveal])
        else:
            # The teacher's distribution at the fine step that revealed each token: zero loss for tokens whose
            # context did not change within the step, so only coordination is trained (and nothing is sharpened).
            lq = torch.log_softmax(logits[reveal], -1)
            lt = lp_t[reveal].float()
            loss = (lt.exp() * (lt - lq)).sum(-1).mean()
        for grp in opt.param_groups:
            grp["lr"] = args.lr * min(1.0, (i + 1) / args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            acc = float((scores[reveal].argmax(-1) == x[reveal]).float().mean())
        log.append({"step": i + 1, "loss": loss.item(), "accuracy": acc, "revealed": int(reveal.sum())})
        if (i + 1) % args.log_every == 0 or i + 1 == args.steps:
            el = time.perf_counter() - start
            rate = (i + 1) / el
            recent = log[-args.log_every:]
            print(f"[train] step {i + 1}/{args.steps} loss {np.mean([r['loss'] for r in recent]):.4f} "
                  f"acc {np.mean([r['accuracy'] for r in recent]):.4f} {rate:.2f} it/s "
                  f"eta {(args.steps - i - 1) / rate:.0f}s", flush=True)
        if (i + 1) % args.val_every == 0 or i + 1 == args.steps:
            acc, kl = validation_metrics(student, val, *val_args)
            log[-1].update({"val_accuracy": acc, "val_kl": kl})
            print(f"[val] step {i + 1} accuracy {acc:.4f} kl {kl:.4f}", flush=True)
    student.eval()
    return log


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--chain", required=True)
    ap.add_argument("--teacher-report", required=True)
    ap.add_argument("--pool", required=True, help="directory of teacher@fine_steps samples (chunk_XXXX.npy)")
    ap.add_argument("--make-pool", type=int, default=0, help="first make (or complete) a pool of this many samples")
    ap.add_argument("--pool-seed", type=int, default=1)
    ap.add_argument("--pool-batch", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--target", choices=["soft", "hard"], default="soft",
                    help="soft: KL to the teacher's distribution at the token's fine reveal step; hard: "
                         "cross-entropy of softmax(beta (logits + g)) to the teacher's token")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--beta", type=float, default=8.0, help="sharpness of the training softmax over logits + g")
    ap.add_argument("--extra-layers", type=int, default=0)
    ap.add_argument("--freeze-base", action="store_true", help="train only the noise inputs and extra blocks")
    ap.add_argument("--grid-steps", type=int, default=16)
    ap.add_argument("--fine-steps", type=int, default=256)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="evaluation seed (must not be the pool seed)")
    ap.add_argument("--seed-train", type=int, default=0)
    ap.add_argument("--init-student", default=None, help="student.pt of an earlier run to continue from")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--val-samples", type=int, default=32, help="pool trajectories held out for validation")
    args = ap.parse_args()
    torch.manual_seed(0)  # nothing below draws from the global RNG
    if args.seed == args.pool_seed:
        raise SystemExit("noise_conditioned.py: --seed must differ from --pool-seed (evaluate on unseen noise)")
    if args.fine_steps % args.grid_steps:
        raise SystemExit("noise_conditioned.py: --fine-steps must be a multiple of --grid-steps")

    teacher = load_model(args.teacher)
    V, L = teacher.vocab_size, teacher.seq_len
    if teacher.cfg.model.time_conditioning:
        raise SystemExit("noise_conditioned.py: expects a time-agnostic teacher")
    schedule = get_schedule(teacher.cfg.diffusion.schedule, teacher.cfg.diffusion.eps)

    # The chunk sampler must be the product's coupled sampler.
    ref = coupled_sample(teacher.denoiser, 3, L, 32, V, schedule, args.pool_seed, batch_size=3)
    args_chk = argparse.Namespace(**{**vars(args), "fine_steps": 32, "pool_batch": 2})
    mine = _chunk_sample(teacher, schedule, args_chk, [0, 1, 2])
    if not torch.equal(ref.tokens, mine):
        raise SystemExit("noise_conditioned.py: the chunk sampler drifted from mcd_scale.diffusion.sampling")

    if args.make_pool:
        make_pool(teacher, schedule, args)
    if not args.out:
        return 0
    os.makedirs(args.out, exist_ok=True)
    chain = MarkovChain2.load(args.chain)

    base = load_model(args.teacher).model
    student = NoiseConditionedStudent(base, V, args.fine_steps // args.grid_steps, args.extra_layers)
    # At initialisation the student must be teacher@grid_steps with the coupled sampler.
    ids = list(range(4))
    init_tokens, _, _ = student_sample(student.eval(), args.seed, ids, L, args.grid_steps, V, schedule, args.fine_steps)
    ref = coupled_sample(teacher.denoiser, 4, L, args.grid_steps, V, schedule, args.seed, batch_size=4,
                         greedy_tail=False)
    agree0 = float((init_tokens == ref.tokens).float().mean())
    print(f"[check] student at init vs teacher@{args.grid_steps} coupled: {agree0:.4f} of tokens equal", flush=True)
    if args.init_student:
        student.load_state_dict(torch.load(args.init_student, weights_only=True))
    pool = load_pool(args, V, L)
    n_val = args.val_samples
    val = tuple(a[-n_val:] for a in pool)
    pool = tuple(a[:-n_val] for a in pool)
    print(f"[pool] {pool[0].shape[0]} teacher@{args.fine_steps} trajectories for training, {n_val} held out",
          flush=True)
    log = train(student, pool, val, schedule, args, V) if args.steps > 0 else []
    torch.save(student.state_dict(), os.path.join(args.out, "student.pt"))
    with open(os.path.join(args.out, "train_log.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in log)

    many, few = teacher_curves(args.teacher_report, args.fine_steps, args.grid_steps, "noise_conditioned.py",
                               "--fine-steps / --grid-steps")

    eval_ids = list(range(args.num_samples))
    results = {}
    args_eval = argparse.Namespace(**{**vars(args), "pool_seed": args.seed})
    ref_many = _chunk_sample(teacher, schedule, args_eval, eval_ids)
    few_ref = coupled_sample(teacher.denoiser, args.num_samples, L, args.grid_steps, V, schedule, args.seed,
                             batch_size=16, greedy_tail=False).tokens
    tok, nfe, secs = student_sample(student, args.seed, eval_ids, L, args.grid_steps, V, schedule, args.fine_steps)
    for name, arr_t in (("teacher_coupled@%d" % args.fine_steps, ref_many),
                        ("teacher_coupled@%d" % args.grid_steps, few_ref), ("noise_conditioned", tok)):
        row = {**score_row(chain, arr_t.numpy(), many, few),
               "equal_to_teacher_many_same_noise": float((arr_t == ref_many).float().mean())}
        results[name] = row
        print(name, json.dumps(row), flush=True)
    results["noise_conditioned"].update({"nfe": nfe, "seconds_per_sample": secs / args.num_samples})
    with open(os.path.join(args.out, "result.json"), "w", encoding="utf-8") as fh:
        json.dump({"args": vars(args), "init_agreement_with_teacher_few": agree0, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
