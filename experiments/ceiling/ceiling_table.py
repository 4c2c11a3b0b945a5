#!/usr/bin/env python
"""The honest-ceiling table (mcd_scale/eval/ceiling.py) from samples JSONL files: teacher curves, students,
the oracle ideal and the honest ceiling with bootstrap intervals, the K-vs-2K check and the shares.

    python experiments/ceiling/ceiling_table.py --chain runs/x/data/chain.json --samples runs/x/samples/*.jsonl \
        --out runs/x/ceiling_table
"""
from __future__ import annotations

import argparse
import os
import sys

# run as a script from the repository: this checkout's package, not another install's
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mcd_scale.cli import fail, input_errors  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="experiments/ceiling/ceiling_table.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", required=True)
    ap.add_argument("--samples", nargs="+", required=True)
    ap.add_argument("--out", required=True, help="output prefix (.md and .json are written)")
    ap.add_argument("--many-steps", type=int, default=256)
    ap.add_argument("--few-steps", type=int, default=16)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--pair-prefix", action="store_true",
                    help="cut every configuration to the smallest sample count so that all pair by sample index")
    a = ap.parse_args(argv)
    from mcd_scale.eval.ceiling import render, write_table
    try:
        table = write_table(a.samples, a.chain, a.out, a.many_steps, a.few_steps, a.bootstrap,
                            pair_prefix=a.pair_prefix)
    except input_errors(FileNotFoundError, ValueError, KeyError) as exc:
        return fail("ceiling_table", exc)
    print(render(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
