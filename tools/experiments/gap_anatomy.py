#!/usr/bin/env python
"""Where the synthetic benchmark's quality gap comes from: off-support transitions vs the rest.

    .venv/bin/python tools/experiments/gap_anatomy.py --samples runs/demo/samples.jsonl \
        --chain runs/demo/data/synthetic/chain.json [--json out.json]

For every (model, round, steps, temperature) of the synthetic rows: the share of transitions outside the
chain's sparse support (explained only by the uniform leak, ~14 nats each; MarkovChain2.off_support), the
part of the true NLL per token they account for, and the rest. On the demo chain the whole gap between
256 and 16 steps sits in the first part (docs/results.md, "Where the gap comes from").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from evaluate import GROUP_KEYS, EvaluateError, read_samples, symbol_ids  # noqa: E402

from mcd_scale.eval.synthetic import MarkovChain2  # noqa: E402


def anatomy(chain: MarkovChain2, seqs: np.ndarray) -> dict:
    """Off-support rate, NLL per token from off-support transitions, and the total (nats/token)."""
    off = chain.off_support(seqs)
    a, b, c = seqs[:, :-2], seqs[:, 1:-1], seqs[:, 2:]
    nll_off = (-np.log(chain.transition_probs(a, b, c)) * off).sum(1) / seqs.shape[1]
    total = chain.nll(seqs)
    return {"n": int(len(seqs)), "off_support_rate": float(off.mean()), "nll_off_support": float(nll_off.mean()),
            "nll_rest": float((total - nll_off).mean()), "true_nll": float(total.mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", required=True, help="samples.jsonl (rows with 'ids' or space-separated 'text')")
    ap.add_argument("--chain", required=True, help="chain.json of the synthetic benchmark")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    chain = MarkovChain2.load(args.chain)
    groups: dict[tuple, list] = defaultdict(list)
    try:
        # evaluate.py's reader: the same file format, field checks and file:line errors.
        for row in read_samples(args.samples):
            if row["benchmark"] == "synthetic":
                groups[tuple(row[k] for k in GROUP_KEYS[1:])].append(symbol_ids(row))
        if not groups:
            raise EvaluateError(f"no synthetic rows in {args.samples}")
    except EvaluateError as exc:
        print(f"gap_anatomy: error: {exc}", file=sys.stderr)
        return 2
    out = []
    print("| model | round | steps | T | off-support rate | NLL from off-support | NLL rest | true NLL |")
    print("|---|---|---|---|---|---|---|---|")
    for (model, rnd, steps, temp), rows in sorted(groups.items()):
        r = {"model": model, "round": rnd, "steps": steps, "temperature": temp,
             **anatomy(chain, np.asarray(rows, dtype=np.int64))}
        out.append(r)
        print(f"| {model} | {rnd} | {steps} | {temp:g} | {r['off_support_rate']:.4f} | {r['nll_off_support']:.3f} | "
              f"{r['nll_rest']:.3f} | {r['true_nll']:.3f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
