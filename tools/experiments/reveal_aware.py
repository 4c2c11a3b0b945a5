#!/usr/bin/env python
"""Experiment: can a factorised few-step student beat its teacher's few-step frontier on the exact benchmark
if it knows which tokens a step reveals together and is trained on its own parallel reveals?

Why (docs/results.md, "Why, as far as we can tell"): the gap between 256 and 16 steps on the synthetic chain
comes from tokens revealed in the same step being drawn independently. MCD's coupled targets are built from
data tokens, so for a token revealed between t and s its target is the data token (cross-entropy: the
teacher's own marginal) and the student never sees what its own simultaneous draws do to each other. This
script tests the two missing ingredients, outside the product, on one process:

1. *Reveal-aware input.* Which tokens a step reveals never depends on the network (docs/method.md §7), so the
   sampler can tell the network: positions revealed in this step carry a second mask id (V + 1, a padded
   vocabulary row initialised as a copy of the mask embedding; the teacher never sees it).
2. *On-policy mean-field targets.* For a training step t -> s on the 16-step grid, the student draws
   y ~ q(. | z_t) at the revealed set R (no gradient), R is split at random into halves A and B, and the
   frozen teacher scores each half given the other half's draws: target_i = p_T(. | z_t, y_A) for i in B and
   p_T(. | z_t, y_B) for i in A (two teacher calls). Loss = mean over R of KL(q_i || target_i). Its fixed
   point, q_i ∝ exp(E_y log p_T(x_i | z_t, y_other)), is the mean-field update for the teacher's joint over
   R: a token with no neighbour in R keeps the teacher's marginal (no entropy spent), a token with one
   sharpens toward values its neighbours' draws agree with. ``--split parity`` puts neighbours in
   different halves always.
3. Or (``--objective coordinated``) supervised targets that make independent draws consistent: tokens of R
   within ``--reach`` of each other form a cluster; each but the last is trained toward the teacher's
   greedy value given the cluster's earlier values, the last toward the teacher's distribution given them,
   a lone token toward the teacher's distribution (cross-entropy; one teacher call per rank).

Results, and why the gap on this benchmark is made of same-step conflicts: docs/results.md, "Where the
gap comes from" and "A reveal-aware student".

Output (``--out DIR``): ``student.safetensors`` (+ ``config.resolved.yaml``), ``samples.jsonl`` in the
report's row format, ``result.json`` with true NLL, entropy and gap closed at each temperature against the
teacher rows of ``--teacher-report`` (same sampler, seed, sample count). Reproducible: every draw is keyed.

    .venv/bin/python tools/experiments/reveal_aware.py --teacher /tmp/xt/teacher \
        --chain runs/demo/data/synthetic/chain.json --teacher-report /tmp/xt/eval_v2/report.json --out /tmp/ra
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from sample import load_model  # noqa: E402

from mcd_scale.diffusion.sampling import _CountingDenoiser, _fill, sampling_times  # noqa: E402
from mcd_scale.diffusion.schedules import get_schedule  # noqa: E402
from mcd_scale.eval.frontier import gap_closed  # noqa: E402
from mcd_scale.eval.metrics import per_sample_unigram_entropy  # noqa: E402
from mcd_scale.eval.synthetic import MarkovChain2  # noqa: E402
from mcd_scale.model.weights import full_state_dict, save_safetensors  # noqa: E402
from mcd_scale.rng import keyed_generator  # noqa: E402


def reveal_aware_sample(net, num_samples: int, seq_len: int, steps: int, vocab_size: int, schedule, seed: int,
                        temperature: float, batch_size: int, reveal_id,
                        reveal_step: list | None = None) -> tuple[torch.Tensor, float, float]:
    """The product's ancestral sampler (same keyed draws, same Gumbel noise, greedy tail), except that when
    ``reveal_id`` is set the positions revealed in a step are fed as ``reveal_id`` instead of the mask id.
    With ``reveal_id=None`` it is exactly :func:`mcd_scale.diffusion.sampling.ancestral_sample` (checked)."""
    times = sampling_times(steps)
    alphas = schedule.alpha(times)
    mask_id = vocab_size
    out, calls, start = [], 0, time.perf_counter()
    for lo in range(0, num_samples, batch_size):
        ids = list(range(lo, min(lo + batch_size, num_samples)))
        z = torch.full((len(ids), seq_len), mask_id, dtype=torch.long)
        when = torch.full((len(ids), seq_len), steps, dtype=torch.long)  # step that revealed each token
        counter = _CountingDenoiser(net, vocab_size)
        gens = [keyed_generator("ancestral", seed, i) for i in ids]

        def step(reveal: torch.Tensor, t: float, greedy: bool, k: int) -> None:
            when[reveal] = k
            rows = reveal.any(dim=1).nonzero().flatten()
            if rows.numel() == 0:
                return
            sub = z[rows]
            inp = sub.clone()
            if reveal_id is not None:
                inp[reveal[rows]] = reveal_id
            logits = counter.logits(inp, t)
            _fill(sub, reveal[rows], logits, [ids[int(r)] for r in rows], seed, vocab_size, temperature,
                  "ancestral-gumbel", greedy=greedy)
            z[rows] = sub

        for k in range(steps):
            a_t, a_s = float(alphas[k]), float(alphas[k + 1])
            draws = torch.stack([torch.rand(seq_len, generator=g, dtype=torch.float64) for g in gens])
            step((z == mask_id) & (draws < (a_s - a_t) / (1.0 - a_t)), float(times[k]), greedy=False, k=k)
        step(z == mask_id, float(times[-1]), greedy=True, k=steps)
        out.append(z)
        if reveal_step is not None:
            reveal_step.append(when)
        calls += counter.calls
    return torch.cat(out), calls / num_samples, time.perf_counter() - start


def train(student, teacher, chain: MarkovChain2, schedule, args, vocab_size: int, reveal_id) -> list[dict]:
    """On-policy mean-field distillation on the ``args.grid_steps``-step sampling grid (module docstring)."""
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    times = sampling_times(args.grid_steps)
    alphas = schedule.alpha(times)
    mask_id, L, B = vocab_size, args.seq_len, args.batch
    log, start = [], time.perf_counter()
    for i in range(args.steps):
        step = args.start_step + i  # data and draws keyed by the global step, so a continued run sees new data
        gen = keyed_generator("reveal-aware-train", args.seed, step)
        x = torch.from_numpy(chain.sample(B, L, seed=10_000 + args.seed * 100_000 + step)).long()
        k = torch.randint(0, args.grid_steps, (B,), generator=gen)
        a_t, a_s = alphas[k].unsqueeze(1), alphas[k + 1].unsqueeze(1)
        u = torch.rand(B, L, generator=gen, dtype=torch.float64)
        masked = u >= a_t                              # z_t: each token revealed with probability alpha_t
        reveal = masked & (u < a_s)                    # revealed by t -> s (the same law as the sampler's draws)
        last = k == args.grid_steps - 1                # the sampler's greedy tail reveals the rest at the end
        reveal[last] = masked[last]
        z_t = torch.where(masked, torch.full_like(x, mask_id), x)
        t_in = torch.zeros(B)                          # time-agnostic models (as the demo teachers)
        inp = z_t.clone()
        if reveal_id is not None:
            inp[reveal] = reveal_id
        student.train()
        logq = torch.log_softmax(student(inp, t_in)[..., :vocab_size].float(), dim=-1)
        if args.objective == "coordinated":
            target_p = coordinated_targets(teacher, z_t, reveal, t_in, vocab_size, args.tau, args.reach)
            ce = -(target_p * logq).sum(-1)
            n = int(reveal.sum())
            loss = ce[reveal].sum() / max(n, 1)
        else:
            loss, n = meanfield_loss(teacher, logq, z_t, reveal, t_in, gen, args, vocab_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            ent = float(-(logq.exp() * logq).sum(-1)[reveal].mean()) if n else float("nan")
        log.append({"step": step + 1, "loss": loss.item(), "reveal_entropy": ent, "revealed": n})
        if (i + 1) % args.log_every == 0 or i + 1 == args.steps:
            el = time.perf_counter() - start
            rate = (i + 1) / el
            recent = log[-args.log_every:]
            print(f"[train] step {i + 1}/{args.steps} loss {np.mean([r['loss'] for r in recent]):.4f} "
                  f"entropy@R {np.nanmean([r['reveal_entropy'] for r in recent]):.3f} "
                  f"{rate:.2f} it/s eta {(args.steps - i - 1) / rate:.0f}s", flush=True)
    student.eval()
    return log


def cluster_ranks(reveal: torch.Tensor, reach: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For revealed positions: rank within their cluster (a run of revealed positions each within ``reach``
    of the previous one) and whether they are the cluster's last. [B, L] long and bool."""
    B, L = reveal.shape
    rank = torch.full((B, L), -1, dtype=torch.long)
    last_pos = torch.full((B,), -10 * L, dtype=torch.long)
    last_rank = torch.zeros(B, dtype=torch.long)
    for i in range(L):
        r = reveal[:, i]
        near = (i - last_pos) <= reach
        rank[:, i] = torch.where(r, torch.where(near, last_rank + 1, torch.zeros_like(last_rank)), rank[:, i])
        last_rank = torch.where(r, rank[:, i], last_rank)
        last_pos = torch.where(r, torch.full_like(last_pos, i), last_pos)
    nxt = torch.zeros((B, L), dtype=torch.bool)
    for d in range(1, reach + 1):
        nxt[:, :-d] |= reveal[:, d:]
    return rank, reveal & ~nxt


def coordinated_targets(teacher, z_t, reveal, t_in, vocab_size: int, tau: float, reach: int,
                        max_rank: int = 3) -> torch.Tensor:
    """Target probabilities [B, L, V] that make independent draws within a step consistent: in each cluster
    of tokens revealed together (within ``reach``), every token but the last is the teacher's greedy value
    given the cluster's earlier (greedy) values, and the last gets the teacher's distribution given them;
    a lone token gets the teacher's distribution. One teacher call per rank (<= max_rank + 1 calls)."""
    rank, last = cluster_ranks(reveal, reach)
    target = torch.zeros(*z_t.shape, vocab_size)
    filled = z_t.clone()
    with torch.no_grad():
        for r in range(max_rank + 1):
            sel = reveal & ((rank == r) if r < max_rank else (rank >= r))
            if not bool(sel.any()):
                break
            lp = torch.log_softmax(teacher(filled, t_in)[..., :vocab_size].float() / tau, dim=-1)
            greedy = lp.argmax(-1)
            soft = sel & (last if r < max_rank else torch.ones_like(last))
            hard = sel & ~soft
            target[soft] = lp[soft].exp()
            target[hard] = torch.nn.functional.one_hot(greedy[hard], vocab_size).float()
            filled = torch.where(hard, greedy, filled)
    return target


def meanfield_loss(teacher, logq, z_t, reveal, t_in, gen, args, vocab_size: int):
    """Reverse KL of each revealed token to the teacher given the other half's on-policy draws."""
    B, L = z_t.shape
    with torch.no_grad():
        y = torch.multinomial(logq.detach().exp().reshape(-1, vocab_size), 1, generator=gen).view(B, L)
        if args.split == "parity":
            # Adjacent positions always fall in different halves, so every pair of neighbours revealed
            # together is scored against each other (the chain's support constraint is between neighbours).
            half = (torch.arange(L) % 2 == 0).expand(B, L)
        else:
            half = torch.rand(B, L, generator=gen) < 0.5
        in_a, in_b = reveal & half, reveal & ~half
        z_a = torch.where(in_a, y, z_t)            # B's positions still masked: the teacher scores them
        z_b = torch.where(in_b, y, z_t)
        lp_a = torch.log_softmax(teacher(z_a, t_in)[..., :vocab_size].float() / args.tau, dim=-1)
        lp_b = torch.log_softmax(teacher(z_b, t_in)[..., :vocab_size].float() / args.tau, dim=-1)
        target = torch.where(in_b.unsqueeze(-1), lp_a, lp_b)
    kl = (logq.exp() * (logq - target)).sum(-1)
    n = int(reveal.sum())
    return kl[reveal].sum() / max(n, 1), n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher run dir / checkpoint / model.safetensors")
    ap.add_argument("--chain", required=True, help="chain.json of the synthetic benchmark")
    ap.add_argument("--teacher-report", required=True, help="report.json with the teacher's rows (same protocol)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=600, help="training steps (0: measure the teacher only)")
    ap.add_argument("--student", default=None, help="a student.safetensors written by an earlier run: skip training")
    ap.add_argument("--init-student", default=None,
                    help="continue training this student.safetensors (with --start-step = the steps it had)")
    ap.add_argument("--start-step", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--tau", type=float, default=1.0, help="teacher temperature of the targets")
    ap.add_argument("--objective", choices=["meanfield", "coordinated"], default="meanfield")
    ap.add_argument("--reach", type=int, default=2, help="coordinated: tokens this close revealed together form a cluster")
    ap.add_argument("--split", choices=["random", "parity"], default="random",
                    help="how the revealed set is halved for the two teacher calls")
    ap.add_argument("--no-flag", action="store_true",
                    help="control: train and sample without the reveal flag (a plain masked-diffusion student)")
    ap.add_argument("--grid-steps", type=int, default=16, help="the student's sampling step count")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 1.1])
    ap.add_argument("--teacher-temperatures", type=float, nargs="*", default=[],
                    help="also sample the teacher at these temperatures (16 and 256 steps, same protocol) to "
                         "extend its curves to the student's entropy")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--sample-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args()
    torch.manual_seed(0)  # nothing below draws from the global RNG; this only pins library defaults
    os.makedirs(args.out, exist_ok=True)

    teacher = load_model(args.teacher)
    cfg, V = teacher.cfg, teacher.vocab_size
    args.seq_len = teacher.seq_len
    if cfg.model.time_conditioning:
        raise SystemExit("reveal_aware.py: expects a time-agnostic teacher (model.time_conditioning: false)")
    reveal_id = V + 1
    if reveal_id >= cfg.model.padded_vocab:
        raise SystemExit(f"reveal_aware.py: no spare vocabulary row for the reveal id (padded vocab "
                         f"{cfg.model.padded_vocab}, V + 1 = {reveal_id}); raise model.pad_vocab_multiple")
    schedule = get_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
    chain = MarkovChain2.load(args.chain)
    for p in teacher.model.parameters():
        p.requires_grad_(False)

    student = load_model(args.teacher).model
    with torch.no_grad():
        student.embed.weight[reveal_id].copy_(student.embed.weight[V])

    # The sampler with reveal_id=None must be the product's ancestral sampler.
    from mcd_scale.diffusion.sampling import ancestral_sample
    ref = ancestral_sample(teacher.denoiser, 4, args.seq_len, args.grid_steps, V, schedule, args.seed, batch_size=4)
    mine, _, _ = reveal_aware_sample(teacher.denoiser, 4, args.seq_len, args.grid_steps, V, schedule, args.seed,
                                     1.0, 4, None)
    if not torch.equal(ref.tokens, mine):
        raise SystemExit("reveal_aware.py: the sampler copy drifted from mcd_scale.diffusion.sampling")

    from mcd_scale.model.weights import load_full_state_dict, load_safetensors
    if args.student or args.init_student:
        load_full_state_dict(student, load_safetensors(args.student or args.init_student), None)
    if args.student:
        student.eval()
        log = []
    else:
        log = train(student, teacher.model, chain, schedule, args, V, None if args.no_flag else reveal_id)
        save_safetensors(full_state_dict(student), os.path.join(args.out, "student.safetensors"))
    shutil.copy(os.path.join(os.path.dirname(teacher.weights_path), "config.resolved.yaml"), args.out)
    with open(os.path.join(args.out, "train_log.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in log)

    teacher_rows = [r for r in json.load(open(args.teacher_report, encoding="utf-8"))
                    if r["model"] == "teacher" and r.get("benchmark", "synthetic") == "synthetic"]
    many = [(r["entropy"], r["quality"]) for r in teacher_rows if r["steps"] == 16 * args.grid_steps]
    few = [(r["entropy"], r["quality"]) for r in teacher_rows if r["steps"] == args.grid_steps]

    def measure(name: str, net, steps: int, temp: float, rid) -> tuple[dict, np.ndarray]:
        """Sample, score exactly, and split off-support transitions by whether their last two tokens were
        revealed in the same step (the parallel-reveal conflicts the gap is made of)."""
        when: list = []
        tokens, nfe, secs = reveal_aware_sample(net, args.num_samples, args.seq_len, steps, V, schedule, args.seed,
                                                temp, args.sample_batch, rid, when)
        arr, step_of = tokens.numpy(), torch.cat(when).numpy()
        nll, ent = chain.nll(arr), per_sample_unigram_entropy(arr)
        off = chain.off_support(arr)                         # transition (j, j+1) -> j+2
        same = step_of[:, 1:-1] == step_of[:, 2:]            # j+1 and j+2 revealed in the same step
        row = {"model": name, "steps": steps, "temperature": temp, "true_nll": float(nll.mean()),
               "true_nll_se": float(nll.std(ddof=1) / math.sqrt(len(nll))), "entropy": float(ent.mean()),
               "nfe": nfe, "seconds_per_sample": secs / args.num_samples,
               "off_support_rate": float(off.mean()), "same_step_share": float(same.mean()),
               "off_support_rate_same_step": float(off[same].mean()) if same.any() else None,
               "off_support_rate_other": float(off[~same].mean()),
               "off_support_from_same_step": float((off & same).sum() / max(int(off.sum()), 1))}
        return row, arr

    extra_teacher = []
    for temp in args.teacher_temperatures:
        for steps, curve in ((16 * args.grid_steps, many), (args.grid_steps, few)):
            row, _ = measure("teacher", teacher.denoiser, steps, temp, None)
            curve.append((row["entropy"], row["true_nll"]))
            extra_teacher.append(row)
            print(json.dumps(row), flush=True)

    def den(z, t):
        with torch.no_grad():
            return student(z, t).float()

    results, lines = [], []
    configs = ([("student_no_flag", None)] if args.no_flag else
               [("reveal_aware", reveal_id), ("student_without_flag", None)])
    for name, rid in configs if (args.steps > 0 or args.student) else []:
        for temp in args.temperatures:
            row, arr = measure(name, den, args.grid_steps, temp, rid)
            g = gap_closed(many, few, (row["entropy"], row["true_nll"]))
            row.update({"gap_closed": g.fraction, "teacher_many_at_entropy": g.teacher_many_quality,
                        "teacher_few_at_entropy": g.teacher_few_quality, "note": g.note})
            results.append(row)
            print(json.dumps(row), flush=True)
            lines += [json.dumps({"benchmark": "synthetic", "model": name, "round": 1, "steps": args.grid_steps,
                                  "temperature": temp, "text": " ".join(map(str, r.tolist()))}) + "\n" for r in arr]
    with open(os.path.join(args.out, "samples.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(lines)
    with open(os.path.join(args.out, "result.json"), "w", encoding="utf-8") as fh:
        json.dump({"args": vars(args), "extra_teacher": extra_teacher, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
