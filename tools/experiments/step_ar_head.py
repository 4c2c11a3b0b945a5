#!/usr/bin/env python
"""Experiment: a 16-step student whose tokens revealed in the same step are drawn in sequence by a small head.

Why (docs/results.md, "Where the gap comes from"): the 256-vs-16-step gap on the synthetic chain is made of
tokens revealed in the same step being drawn independently from the marginals at z_t. Teacher@256 with the
coupled sampler reveals the same tokens in the same coarse step, but one fine step at a time, each from the
teacher's distribution given the values revealed before it. This student keeps one full network call per
coarse step (the frozen teacher's hidden states at z_t) and adds a small attention head over the tokens the
step reveals only: token j attends to the co-revealed tokens of earlier fine steps (their drawn values and
distances), and its logits are the teacher's head applied to the corrected hidden state. Sampling runs the
head once per distinct fine step in the coarse step (a few small passes over ~16 tokens), so a sample still
costs 16 full network calls.

Training is teacher-forced on teacher@256 coupled trajectories (``noise_conditioned.py --make-pool``): the
earlier co-revealed values are the teacher's own, and the target of each revealed token is the teacher's
distribution at the fine step that revealed it (KL, zero for tokens whose context did not change within the
step). The teacher network is frozen; only the head trains. At initialisation (zero output projections) the
student is exactly teacher@16 with the coupled sampler (checked). Not MCD (docs/method.md §5): the student's
interface adds the within-step order of reveals, which the coupled sampler knows from u.

Result (negative; docs/results.md, "Students that see the order of reveals within a step"): no
generalisation in the minutes this machine allows.

    .venv/bin/python tools/experiments/step_ar_head.py --teacher /tmp/xt/teacher \
        --chain runs/demo/data/synthetic/chain.json --teacher-report /tmp/xt/eval_v2/report.json \
        --pool /tmp/nc/pool --out /tmp/nc/head1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, HERE)

from noise_conditioned import (_chunk_sample, batch_inputs, fine_order, load_pool, reveal_steps,  # noqa: E402
                               sampler_noise)
from sample import load_model  # noqa: E402

from mcd_scale.diffusion.sampling import coupled_sample, sampling_times  # noqa: E402
from mcd_scale.diffusion.schedules import get_schedule  # noqa: E402
from mcd_scale.eval.synthetic import MarkovChain2  # noqa: E402

from chain_scores import score_row, teacher_curves  # noqa: E402

REACH = 8  # relative-distance buckets -REACH..REACH, plus one for anything farther on each side


class StepHead(nn.Module):
    """Attention over co-revealed tokens of earlier fine steps (+ a sink), then an MLP; zero-initialised outputs."""

    def __init__(self, hidden: int, vocab_size: int, heads: int = 4, ffn: int = 512, layers: int = 1):
        super().__init__()
        self.heads, self.hd = heads, hidden // heads
        self.value_embed = nn.Embedding(vocab_size, hidden)
        nn.init.normal_(self.value_embed.weight, std=0.02)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.ModuleDict({
                "norm_q": nn.LayerNorm(hidden), "norm_kv": nn.LayerNorm(hidden), "norm_m": nn.LayerNorm(hidden),
                "q": nn.Linear(hidden, hidden), "kv": nn.Linear(hidden, 2 * hidden), "out": nn.Linear(hidden, hidden),
                "fc1": nn.Linear(hidden, ffn), "fc2": nn.Linear(ffn, hidden)})
            layer["dist_bias"] = nn.Embedding(2 * REACH + 3, heads)
            nn.init.zeros_(layer["dist_bias"].weight)
            for name in ("out", "fc2"):
                nn.init.zeros_(layer[name].weight)
                nn.init.zeros_(layer[name].bias)
            self.layers.append(layer)
        self.sink_kv = nn.Parameter(torch.zeros(2 * hidden))

    def forward(self, h: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, order: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """h [B, R, H] (teacher hidden states of the revealed tokens), values/pos/order/valid [B, R].
        Token j attends to tokens i with valid_i and order_i < order_j (and to the sink). Returns h + correction."""
        B, R, H = h.shape
        d = pos.unsqueeze(1) - pos.unsqueeze(2)                       # [B, Rq, Rk]: key position - query position
        bucket = d.clamp(-REACH - 1, REACH + 1) + REACH + 1
        allowed = valid.unsqueeze(1) & (order.unsqueeze(1) < order.unsqueeze(2))
        allowed = torch.cat([torch.ones(B, R, 1, dtype=torch.bool), allowed], dim=2)   # the sink first
        keys_in = h + self.value_embed(values.clamp(min=0))
        x = h
        for layer in self.layers:
            q = layer["q"](layer["norm_q"](x)).view(B, R, self.heads, self.hd).transpose(1, 2)
            kv = layer["kv"](layer["norm_kv"](keys_in))
            kv = torch.cat([self.sink_kv.expand(B, 1, -1), kv], dim=1)
            k, v = kv.view(B, R + 1, 2, self.heads, self.hd).unbind(2)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            bias = layer["dist_bias"](bucket).permute(0, 3, 1, 2)       # [B, heads, Rq, Rk]
            bias = torch.cat([torch.zeros(B, self.heads, R, 1), bias], dim=3)
            bias = bias.masked_fill(~allowed.unsqueeze(1), float("-inf"))
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            x = x + layer["out"](att.transpose(1, 2).reshape(B, R, H))
            x = x + layer["fc2"](F.gelu(layer["fc1"](layer["norm_m"](x))))
        return x


class StepARStudent(nn.Module):
    def __init__(self, base: nn.Module, vocab_size: int, head_layers: int):
        super().__init__()
        self.base, self.V = base, vocab_size
        for p in base.parameters():
            p.requires_grad_(False)
        self.step_head = StepHead(base.cfg.hidden, vocab_size, layers=head_layers)
        with torch.no_grad():  # a drawn value enters as the teacher's own embedding of that token
            self.step_head.value_embed.weight.copy_(base.embed.weight[:vocab_size])

    def hidden(self, z: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's last residual stream at z (one full network call)."""
        b = self.base
        with torch.no_grad():
            h = b.embed(z)
            for block in b.blocks:
                h = block(h, None)
        return h

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.base.head(self.base.final(h, None))[..., :self.V].float()


def gather_revealed(reveal: torch.Tensor, *tensors: torch.Tensor):
    """Pack the revealed positions of each row to the left: (pos [B, R], valid [B, R], gathered tensors)."""
    B, L = reveal.shape
    R = max(int(reveal.sum(1).max()), 1)
    # Stable sort puts revealed positions first, in position order.
    key = (~reveal).long() * 2 * L + torch.arange(L).unsqueeze(0)
    pos = key.argsort(dim=1)[:, :R]
    valid = torch.gather(reveal, 1, pos)
    out = [torch.gather(t, 1, pos if t.dim() == 2 else pos.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
           for t in tensors]
    return pos, valid, out


def student_sample(student: StepARStudent, seed: int, ids: list[int], seq_len: int, steps: int, vocab_size: int,
                   schedule, fine_steps: int, temperature: float = 1.0):
    """The coupled sampler with the student: each coarse step calls the network once, then draws its revealed
    tokens fine step by fine step through the head, each to argmax(log softmax(logits / T) + g)."""
    times = sampling_times(steps)
    alphas = schedule.alpha(times)
    fine_alphas = schedule.alpha(sampling_times(fine_steps))
    ratio = fine_steps // steps
    mask_id = vocab_size
    start, calls, head_passes = time.perf_counter(), 0, 0
    u, g = sampler_noise(seed, ids, seq_len, vocab_size)
    z = torch.full((len(ids), seq_len), mask_id, dtype=torch.long)
    with torch.no_grad():
        for k, reveal, rows in reveal_steps(z, u, alphas, mask_id):
            zr, rr = z[rows], reveal[rows]
            h = student.hidden(zr)
            calls += rows.numel()
            order = fine_order(u[rows], fine_alphas, torch.full((rows.numel(),), k, dtype=torch.long), ratio)
            pos, valid, (h_r, order_r, g_r) = gather_revealed(rr, h, order, g[rows])
            values = torch.full(pos.shape, -1, dtype=torch.long)
            for o in sorted(set(order_r[valid].tolist())):
                # Only tokens of earlier fine steps are attended to, so their values are already drawn.
                x = student.step_head(h_r, values, pos, order_r, valid)
                head_passes += 1
                logits = student.logits_from_hidden(x)
                score = torch.log_softmax(logits.double() / temperature, -1) + g_r
                now = valid & (order_r == o)
                values = torch.where(now, score.argmax(-1), values)
            sub = zr.clone()
            sub.scatter_(1, pos, torch.where(valid, values, torch.gather(zr, 1, pos)))
            z[rows] = sub
    return z, calls / len(ids), head_passes, time.perf_counter() - start


def step_loss(student, x, u, lp_t, k, consts):
    alphas, fine_alphas, ratio, grid_steps, mask_id = consts
    z_t, reveal, order = batch_inputs(x, u, k, alphas, fine_alphas, ratio, grid_steps, mask_id)
    h = student.hidden(z_t)
    pos, valid, (h_r, order_r, x_r, lp_r) = gather_revealed(reveal, h, order, x, lp_t)
    out = student.step_head(h_r, x_r, pos, order_r, valid)        # teacher forcing: earlier values are the teacher's
    lq = torch.log_softmax(student.logits_from_hidden(out)[valid], -1)
    lt = lp_r[valid].float()
    kl = (lt.exp() * (lt - lq)).sum(-1)
    acc = (lq.argmax(-1) == lt.argmax(-1)).float().mean()
    return kl.mean(), float(acc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--chain", required=True)
    ap.add_argument("--teacher-report", required=True)
    ap.add_argument("--pool", required=True, help="teacher@fine trajectories (noise_conditioned.py --make-pool)")
    ap.add_argument("--pool-seed", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--head-layers", type=int, default=1)
    ap.add_argument("--grid-steps", type=int, default=16)
    ap.add_argument("--fine-steps", type=int, default=256)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--sample-batch", type=int, default=16)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    ap.add_argument("--seed", type=int, default=0, help="evaluation seed (must not be the pool seed)")
    ap.add_argument("--val-samples", type=int, default=64)
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--student", default=None, help="head.pt of an earlier run: skip training")
    args = ap.parse_args()
    torch.manual_seed(0)  # the head's init; every data draw below is keyed
    if args.seed == args.pool_seed:
        raise SystemExit("step_ar_head.py: --seed must differ from --pool-seed (evaluate on unseen noise)")
    os.makedirs(args.out, exist_ok=True)
    teacher = load_model(args.teacher)
    V, L = teacher.vocab_size, teacher.seq_len
    schedule = get_schedule(teacher.cfg.diffusion.schedule, teacher.cfg.diffusion.eps)
    chain = MarkovChain2.load(args.chain)
    student = StepARStudent(load_model(args.teacher).model, V, args.head_layers)

    init_tokens, _, _, _ = student_sample(student, args.seed, list(range(4)), L, args.grid_steps, V, schedule,
                                          args.fine_steps)
    ref = coupled_sample(teacher.denoiser, 4, L, args.grid_steps, V, schedule, args.seed, batch_size=4,
                         greedy_tail=False)
    agree0 = float((init_tokens == ref.tokens).float().mean())
    print(f"[check] student at init vs teacher@{args.grid_steps} coupled: {agree0:.4f} of tokens equal", flush=True)
    if agree0 < 0.999:
        raise SystemExit("step_ar_head.py: the student at initialisation is not teacher@grid_steps")

    x_all, u_all, _g, lp_all = load_pool(argparse.Namespace(pool=args.pool, pool_seed=args.pool_seed), V, L)
    del _g
    nv = args.val_samples
    val, train_set = (x_all[-nv:], u_all[-nv:], lp_all[-nv:]), (x_all[:-nv], u_all[:-nv], lp_all[:-nv])
    print(f"[pool] {train_set[0].shape[0]} trajectories for training, {nv} held out", flush=True)
    consts = (schedule.alpha(sampling_times(args.grid_steps)), schedule.alpha(sampling_times(args.fine_steps)),
              args.fine_steps // args.grid_steps, args.grid_steps, V)

    def validate() -> tuple[float, float]:
        tot_kl = tot_acc = 0.0
        with torch.no_grad():
            for kv in range(args.grid_steps):
                kl, acc = step_loss(student, *val[:2], val[2], torch.full((nv,), kv, dtype=torch.long), consts)
                tot_kl, tot_acc = tot_kl + float(kl), tot_acc + acc
        return tot_kl / args.grid_steps, tot_acc / args.grid_steps

    log = []
    if args.student:
        student.step_head.load_state_dict(torch.load(args.student, weights_only=True))
    else:
        params = list(student.step_head.parameters())
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        print("[val] step 0 kl %.4f argmax-agreement %.4f" % validate(), flush=True)
        n, start = train_set[0].shape[0], time.perf_counter()
        from mcd_scale.rng import keyed_generator
        for i in range(args.steps):
            gen = keyed_generator("step-ar-head-train", 0, i)
            idx = torch.randint(0, n, (args.batch,), generator=gen)
            k = torch.randint(0, args.grid_steps, (args.batch,), generator=gen)
            for grp in opt.param_groups:  # warmup, then cosine to 10%
                frac = i / max(args.steps - 1, 1)
                grp["lr"] = args.lr * min(1.0, (i + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            loss, acc = step_loss(student, train_set[0][idx], train_set[1][idx], train_set[2][idx], k, consts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            log.append({"step": i + 1, "loss": loss.item(), "agreement": acc})
            if (i + 1) % args.log_every == 0:
                rate = (i + 1) / (time.perf_counter() - start)
                rec = log[-args.log_every:]
                print(f"[train] step {i + 1}/{args.steps} kl {np.mean([r['loss'] for r in rec]):.4f} "
                      f"agreement {np.mean([r['agreement'] for r in rec]):.4f} {rate:.2f} it/s "
                      f"eta {(args.steps - i - 1) / rate:.0f}s", flush=True)
            if (i + 1) % args.val_every == 0 or i + 1 == args.steps:
                kl, acc = validate()
                log[-1].update({"val_kl": kl, "val_agreement": acc})
                print(f"[val] step {i + 1} kl {kl:.4f} argmax-agreement {acc:.4f}", flush=True)
        torch.save(student.step_head.state_dict(), os.path.join(args.out, "head.pt"))
    with open(os.path.join(args.out, "train_log.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in log)

    many, few = teacher_curves(args.teacher_report, args.fine_steps, args.grid_steps, "step_ar_head.py",
                               "--fine-steps / --grid-steps")
    eval_ids = list(range(args.num_samples))
    ref_many = _chunk_sample(teacher, schedule, argparse.Namespace(
        fine_steps=args.fine_steps, pool_seed=args.seed, pool_batch=64), eval_ids)

    def score(name: str, arr_t: torch.Tensor, extra: dict) -> dict:
        row = {"model": name, **score_row(chain, arr_t.numpy(), many, few),
               "equal_to_teacher_many_same_noise": float((arr_t == ref_many).float().mean()), **extra}
        print(json.dumps(row), flush=True)
        return row

    results = [score(f"teacher_coupled@{args.fine_steps}", ref_many, {"temperature": 1.0})]
    t0 = time.perf_counter()
    few_ref = coupled_sample(teacher.denoiser, args.num_samples, L, args.grid_steps, V, schedule, args.seed,
                             batch_size=args.sample_batch, greedy_tail=False)
    results.append(score(f"teacher_coupled@{args.grid_steps}", few_ref.tokens,
                         {"temperature": 1.0, "seconds_per_sample": (time.perf_counter() - t0) / args.num_samples}))
    for temp in args.temperatures:
        toks, passes, secs = [], 0, 0.0
        for lo in range(0, args.num_samples, args.sample_batch):
            ids = eval_ids[lo:lo + args.sample_batch]
            tk, nfe, hp, sc = student_sample(student, args.seed, ids, L, args.grid_steps, V, schedule,
                                             args.fine_steps, temp)
            toks.append(tk)
            passes, secs = passes + hp, secs + sc
        results.append(score("step_ar_head", torch.cat(toks),
                             {"temperature": temp, "nfe": nfe, "head_passes_per_batch": passes / math.ceil(
                                 args.num_samples / args.sample_batch), "seconds_per_sample": secs / args.num_samples}))
    with open(os.path.join(args.out, "result.json"), "w", encoding="utf-8") as fh:
        json.dump({"args": vars(args), "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
