#!/usr/bin/env python
"""Does docs/method.md section 7's greedy last step help, or is it a temperature knob? Measured with the exact chain.

The denoiser is the synthetic chain's exact posterior marginals (no training), sampled by the product's
ancestral sampler at several step counts, with the final step t_{N-1} -> t_N sampled (default) or greedy
(``greedy_last_step``), across temperatures. Prints one JSON object: per (steps, greedy, T) the true NLL
and unigram entropy, and for each greedy row the default sampler's temperature curve read at its entropy
(``gain_vs_temperature_nats`` > 0: the greedy step beats plain temperature at matched entropy).

    .venv/bin/python tools/experiments/greedy_last_step.py [--seq-len 64] [--num-samples 64]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mcd_scale.diffusion.sampling import ancestral_sample  # noqa: E402
from mcd_scale.diffusion.schedules import get_schedule  # noqa: E402
from mcd_scale.eval.frontier import interpolate_quality_at_entropy  # noqa: E402
from mcd_scale.eval.metrics import mean_unigram_entropy  # noqa: E402
from mcd_scale.eval.synthetic import MarkovChain2  # noqa: E402


def oracle_denoiser(chain: MarkovChain2):
    def denoise(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logp = chain.oracle_log_marginals(z).float()
        return torch.cat([logp, torch.full((*z.shape, 1), -1e9)], dim=-1)
    return denoise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 0.8, 0.9, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    # The demo's chain (tools/prepare_synthetic.py defaults).
    chain = MarkovChain2(64, branching=4, seed=1234, fanout=4, concentration=1.0, floor=1e-6)
    sched = get_schedule("loglinear", 1e-3)
    den = oracle_denoiser(chain)
    rows = []
    start = time.perf_counter()
    for steps in args.steps:
        for greedy in (False, True):
            for temp in (args.temperatures if not greedy else [1.0]):
                res = ancestral_sample(den, args.num_samples, args.seq_len, steps, 64, sched, seed=args.seed,
                                       temperature=temp, batch_size=16, greedy_last_step=greedy)
                x = res.tokens.numpy()
                rows.append({"steps": steps, "greedy_last_step": greedy, "temperature": temp,
                             "true_nll": float(chain.nll(x).mean()), "entropy": mean_unigram_entropy(x)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        curve = [(r["entropy"], r["true_nll"]) for r in rows if r["steps"] == steps and not r["greedy_last_step"]]
        for r in rows:
            if r["steps"] == steps and r["greedy_last_step"]:
                at = interpolate_quality_at_entropy(curve, r["entropy"])
                r["temperature_curve_at_entropy"] = at.quality if at.in_range else None
                r["gain_vs_temperature_nats"] = (at.quality - r["true_nll"]) if at.in_range else None
    ref = chain.sample(256, args.seq_len, seed=1)
    print(json.dumps({"seq_len": args.seq_len, "num_samples": args.num_samples,
                      "reference": {"true_nll": float(chain.nll(ref).mean()), "entropy": mean_unigram_entropy(ref)},
                      "rows": rows, "seconds": round(time.perf_counter() - start, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
