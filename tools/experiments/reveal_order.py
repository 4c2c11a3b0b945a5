#!/usr/bin/env python
"""Experiment: how much of the 256-vs-16-step gap on the exact benchmark is *which* tokens a step reveals together?

docs/results.md ("Where the gap comes from") traces the gap to neighbours revealed in the same step. This
script keeps the network and the step count and changes only the reveal order of the product's coupled
sampler (``mcd_scale.diffusion.sampling.coupled_sample``, ``reveal_order``):

- ``random``: i.i.d. uniform thresholds (docs/method.md §4; the same law as the ancestral sampler);
- ``strided``: positions j and j' share a step iff j = j' (mod steps), the residue classes in a random
  order per sample, so no two tokens closer than ``steps`` are ever drawn independently in one step.

Output: ``result.json`` with true NLL, entropy and the matched-entropy gap closed against the teacher curves
of ``--teacher-report`` (teacher@256 and teacher@16 with the product sampler), for each model / order / T.

    .venv/bin/python tools/experiments/reveal_order.py --model teacher=/tmp/xt/teacher \
        --model mcd=/tmp/xt/mcd/round_1 --chain runs/demo/data/synthetic/chain.json \
        --teacher-report /tmp/xt/eval_v2/report.json --out /tmp/ro
"""
from __future__ import annotations

import argparse
import json
import os
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from sample import load_model  # noqa: E402

from mcd_scale.diffusion.sampling import coupled_sample  # noqa: E402
from mcd_scale.diffusion.schedules import get_schedule  # noqa: E402
from mcd_scale.eval.synthetic import MarkovChain2  # noqa: E402

from chain_scores import score_row, teacher_curves  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=checkpoint (repeatable)")
    ap.add_argument("--chain", required=True)
    ap.add_argument("--teacher-report", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--orders", nargs="+", default=["random", "strided"])
    ap.add_argument("--steps", type=int, default=16, help="step count (and stride) of the sampled models")
    ap.add_argument("--many-steps", type=int, default=256, help="the teacher curve to close the gap to")
    ap.add_argument("--few-steps", type=int, default=None,
                    help="the teacher curve the gap is measured from (default: --steps)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.8, 0.9, 1.0])
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    chain = MarkovChain2.load(args.chain)
    few_steps = args.few_steps or args.steps
    many, few = teacher_curves(args.teacher_report, args.many_steps, few_steps, "reveal_order.py")
    results = []
    for spec in args.model:
        name, path = spec.split("=", 1)
        m = load_model(path)
        schedule = get_schedule(m.cfg.diffusion.schedule, m.cfg.diffusion.eps)
        for order in args.orders:
            for temp in args.temperatures:
                res = coupled_sample(m.denoiser, args.num_samples, m.seq_len, args.steps, m.vocab_size, schedule,
                                     args.seed, temperature=temp, batch_size=args.batch, reveal_order=order)
                row = {"model": name, "order": order, "steps": args.steps, "temperature": temp,
                       **score_row(chain, res.tokens.numpy(), many, few),
                       "seconds_per_sample": res.seconds / args.num_samples, "nfe": res.nfe}
                results.append(row)
                print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "result.json"), "w", encoding="utf-8") as fh:
        json.dump({"args": vars(args), "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
