#!/usr/bin/env python
"""Write the exact synthetic benchmark: a seeded sparse order-2 Markov chain and its token shards.

``--source switching`` writes the second benchmark instead: a regime-switching order-1 chain whose hidden
regime persists ~1/``--switch-prob`` tokens, so dependencies span the sampler's stride
(:mod:`mcd_scale.eval.synthetic.switching`); chain.json then holds that source (read it with
:func:`mcd_scale.eval.synthetic.load_source`), and its expected NLL / entropy rate in the manifest are
Monte Carlo estimates of the exact NLL (no closed form).

Output (``--out``, default data/synthetic), in the layout of tools/prepare_data.py so the same loader
(:func:`mcd_scale.data.loader.open_prepared`) and trainer read it:
  chain.json                      the chain (spec + full tables; :meth:`MarkovChain2.load`)
  {train,val,heldout}/shard-%06d.tar   webdataset tars, key %010d (global id within the split),
                                       member ``ids.npy`` (uint16, [seq_len])
  manifest.json                   written last: vocab_size (= S), mask_id (= S), seq_len, dtype, seed,
                                  per split {dir, num_samples, shards: [{name, num_samples, bytes, sha256}]},
                                  and the chain's digest, entropy rate and expected NLL per token.
Every sample is drawn from a generator keyed by (seed, split, chunk), so output is byte-identical for
the same flags.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcd_scale.eval.metrics import mean_unigram_entropy  # noqa: E402
from mcd_scale.eval.synthetic import load_source  # noqa: E402
from mcd_scale.eval.synthetic.prepare import oracle_check, prepare  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="data/synthetic")
    ap.add_argument("--source", choices=["chain2", "switching"], default="chain2",
                    help="chain2: sparse order-2 chain; switching: regime-switching chain (long-range dependencies)")
    ap.add_argument("--num-symbols", type=int, default=64, help="S; the mask id is S")
    ap.add_argument("--branching", type=int, default=4, help="allowed successors per context (a, b)")
    ap.add_argument("--fanout", type=int, default=4, help="candidate successors per symbol b")
    ap.add_argument("--concentration", type=float, default=1.0, help="Dirichlet concentration of P(c|a,b)")
    ap.add_argument("--floor", type=float, default=1e-6, help="leak probability of every symbol")
    ap.add_argument("--regimes", type=int, default=4, help="switching: hidden regimes H (>= 2)")
    ap.add_argument("--switch-prob", type=float, default=1.0 / 1024,
                    help="switching: probability the regime changes at each token (persists ~1/p tokens)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--train", type=int, default=20000, help="training sequences")
    ap.add_argument("--validation", type=int, default=512, help="sequences of the 'val' split")
    ap.add_argument("--heldout", type=int, default=512, help="sequences of the 'heldout' split")
    ap.add_argument("--samples-per-shard", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1234, help="keys the chain and every split")
    ap.add_argument("--oracle-check", type=int, default=0, metavar="N",
                    help="also sample N sequences with the exact oracle at seq-len steps (T=1) and seq-len/16 "
                         "steps (T=1, 0.9, 0.8, 0.7) and write oracle_check.json (slow: minutes at N=32)")
    args = ap.parse_args(argv)
    try:
        m = prepare(args.out, args.num_symbols, args.branching, args.fanout, args.concentration, args.floor,
                    args.seq_len, {"train": args.train, "val": args.validation, "heldout": args.heldout},
                    args.seed, args.samples_per_shard, args.source, args.regimes, args.switch_prob)
    except ValueError as exc:
        print(f"prepare_synthetic: error: {exc}", file=sys.stderr)
        return 2
    c = m["chain"]
    print(f"prepare_synthetic: S={m['vocab_size']} (mask id {m['mask_id']}), seq_len {m['seq_len']}, "
          + ", ".join(f"{k} {v['num_samples']}" for k, v in m["splits"].items())
          + f"; entropy rate {c['entropy_rate']:.4f} nats, expected NLL {c['expected_nll_per_token']:.4f} "
          f"nats/token -> {args.out}")
    if args.oracle_check > 0:
        chain = load_source(os.path.join(args.out, "chain.json"))
        few = max(args.seq_len // 16, 1)
        runs = [(args.seq_len, 1.0)] + [(few, t) for t in (1.0, 0.9, 0.8, 0.7)]
        doc = {"expected_nll_per_token": c["expected_nll_per_token"], "entropy_rate": c["entropy_rate"],
               "heldout_entropy": mean_unigram_entropy(chain.sample(512, args.seq_len, seed=args.seed)),
               "runs": oracle_check(chain, args.oracle_check, args.seq_len, args.seed, runs)}
        with open(os.path.join(args.out, "oracle_check.json"), "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
