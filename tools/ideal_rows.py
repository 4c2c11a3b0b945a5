#!/usr/bin/env python
"""Sample the ideal students (the distillation losses' population optima) as report rows on the synthetic benchmark.

    .venv/bin/python tools/ideal_rows.py --chain runs/demo/data/synthetic/chain.json --seq-len 32 \
        --out runs/ideal/samples.jsonl

What the rows are and every flag: :mod:`mcd_scale.eval.ideal_rows`. Exit codes: 0 done, 2 bad input (one line).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcd_scale.eval.ideal_rows import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
