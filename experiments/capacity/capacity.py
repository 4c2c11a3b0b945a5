#!/usr/bin/env python
"""Capacity: the synthetic-only demo with a bigger model for teacher and students alike.

The student is the teacher's architecture, initialised from its weights (tools/distill_rounds.py), so a student
with more capacity means a bigger teacher too. This runs tools/demo.py's plan (``--benchmarks synthetic``: data,
teacher, MCD and SDTT rounds, the ideal rows, sampling, evaluation) with ``--set`` model overrides applied to the
teacher and the distillation alike, into its own directory; report.md then holds the trained students' share of
their ideal's gain on that bigger teacher, to set against the demo's (same data seed, same schedule, same steps).

    .venv/bin/python experiments/capacity/capacity.py --out runs/capacity_l4 --set model.layers=4 [--teacher-seed 1]
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> int:
    from mcd_scale.demo import Demo, make_plan

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", required=True,
                    help="a model override for teacher and students (repeatable), e.g. model.layers=4")
    ap.add_argument("--teacher-seed", type=int, default=None)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    if not all(s.startswith("model.") for s in args.set):
        raise SystemExit("--set takes model.* overrides only (the rest of the plan is the demo's)")
    plan = make_plan(quick=False)
    plan.benchmarks = ("synthetic",)
    plan.teacher_seed = args.teacher_seed
    plan.model_overrides = list(args.set)
    plan.distill_overrides = list(args.set)
    return Demo(args.out, plan, "torchrun", args.nproc).main()


if __name__ == "__main__":
    sys.exit(main())
