"""Sample the ideal students (the distillation losses' population optima) as report rows on the synthetic benchmark.

    .venv/bin/python tools/ideal_rows.py --chain runs/demo/data/synthetic/chain.json --seq-len 32 \
        --out runs/ideal/samples.jsonl
    python tools/evaluate.py --samples runs/ideal/samples.jsonl --synthetic-chain ... --out runs/ideal

Each ideal student (mcd_scale/eval/ideal_student.py: ``mcd-ideal`` = reverse KL, MCD's default loss;
``mcd-ideal-fkl`` = forward KL, the control; ``sdtt-ideal`` = SDTT's target; ``mcd-ceiling`` = the honest
ceiling, the reverse-KL optimum with the teacher's own continuations as data and independent draw sets per
position class, docs/ceiling.md) is sampled with the ancestral
sampler at ``--steps`` like the students, its teacher being the exact chain (default) or a trained
checkpoint (``--teacher-checkpoint``). With ``--teacher-steps`` the teacher itself is sampled too (the exact
chain, or the checkpoint), at every ``--teacher-temperatures``, so the file is a complete synthetic table:
teacher@many and teacher@few curves, and the ideal rows read against them by tools/evaluate.py. Rows are
tools/evaluate.py's samples (model = the kind, round 0, plus "teacher": "exact" or the checkpoint and
"draws"). Exit codes: 0 done, 2 bad input (one line).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import torch

from mcd_scale.eval.ideal_student import ChainTeacher, IdealStudent, KINDS
from mcd_scale import inference
from mcd_scale.cli import ArgumentParser, add_out_arg, add_quiet_arg, fail, input_errors
from mcd_scale.config import DiffusionConfig
from mcd_scale.diffusion.sampling import ancestral_sample
from mcd_scale.diffusion.schedules import get_schedule
from mcd_scale.eval.synthetic import MarkovChain2, SwitchingChain, load_source

DESCRIPTION = "Sample the ideal students (the distillation losses' population optima) as report rows on the synthetic benchmark."


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="tools/ideal_rows.py", description=DESCRIPTION)
    ap.add_argument("--chain", required=True, metavar="FILE", help="chain.json of the synthetic benchmark")
    ap.add_argument("--teacher-checkpoint", metavar="DIR",
                    help="a trained teacher (run dir, checkpoint dir or model.safetensors); default: the exact chain")
    ap.add_argument("--kinds", nargs="*", choices=list(KINDS), default=list(KINDS),
                    help="ideal students to sample (none: only the --teacher-steps rows)")
    ap.add_argument("--steps", type=int, default=16, help="sampler steps of the ideal students (the jump they learn)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0], help="the ideal students' sampling temperatures")
    ap.add_argument("--teacher-steps", type=int, nargs="*", default=[],
                    help="also sample the teacher at these step counts (e.g. 256 16); none by default")
    ap.add_argument("--teacher-temperatures", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 1.0])
    ap.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the checkpoint's; "
                                                                "required with the exact chain)")
    ap.add_argument("--num-samples", type=int, default=40)
    ap.add_argument("--draws", type=int, default=12, help="K: coupled continuations per state and step")
    ap.add_argument("--tau", type=float, default=1.0, help="the teacher's temperature in the loss (docs/method.md section 5)")
    ap.add_argument("--groups", type=int, default=3,
                    help="mcd-ceiling: position classes (index mod G) with independent draw sets")
    ap.add_argument("--continuation-steps", type=int, default=64,
                    help="mcd-ceiling: grid of the teacher's own continuation that draws the data term's x")
    ap.add_argument("--sdtt-teacher-steps", type=int, default=2, help="SDTT's teacher steps per jump")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16, help="rows per sampler call")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_out_arg(ap, metavar="FILE", help="samples JSONL (appended rows of every configuration)", required=True,
                aliases=())
    add_quiet_arg(ap)
    return ap


def _check(args: argparse.Namespace) -> None:
    if min(args.steps, args.num_samples, args.draws, args.batch_size, args.groups, args.continuation_steps) < 1:
        raise ValueError("need --steps, --num-samples, --draws, --batch-size, --groups and --continuation-steps >= 1")
    if any(t <= 0 for t in args.temperatures + args.teacher_temperatures) or args.tau <= 0:
        raise ValueError("temperatures and --tau must be > 0")
    if any(s < 1 for s in args.teacher_steps):
        raise ValueError(f"--teacher-steps must be >= 1, got {args.teacher_steps}")
    if args.teacher_checkpoint is None and args.seq_len is None:
        raise ValueError("--seq-len is required with the exact chain as teacher (no checkpoint to read it from)")
    if args.seq_len is not None and args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {args.seq_len}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check(args)
        try:
            chain = load_source(args.chain)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--chain {args.chain}: {exc}") from None
        if not isinstance(chain, (MarkovChain2, SwitchingChain)):
            raise ValueError(f"--chain {args.chain}: the ideal rows need a synthetic source with exact posterior "
                             f"sampling (order-2 or switching chain); this is a {type(chain).__name__}")
        if args.teacher_checkpoint:
            loaded = inference.load_model(args.teacher_checkpoint)
            if loaded.vocab_size != chain.num_symbols:
                raise ValueError(f"--teacher-checkpoint {args.teacher_checkpoint}: vocab_size {loaded.vocab_size} "
                                 f"!= the chain's {chain.num_symbols} symbols; pass the teacher of this benchmark")
            teacher, who = loaded.denoiser, args.teacher_checkpoint
            schedule = get_schedule(loaded.cfg.diffusion.schedule, loaded.cfg.diffusion.eps)
            seq_len = args.seq_len or loaded.seq_len
        else:
            teacher, who = ChainTeacher(chain), "exact"
            d = DiffusionConfig()
            schedule, seq_len = get_schedule(d.schedule, d.eps), args.seq_len
    except input_errors(FileNotFoundError, ValueError, KeyError) as exc:
        return fail("ideal_rows", exc)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    V = chain.num_symbols
    jobs = [("teacher", s, t) for s in args.teacher_steps for t in args.teacher_temperatures]
    jobs += [(kind, args.steps, t) for kind in args.kinds for t in args.temperatures]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    start = time.perf_counter()
    with open(args.out + ".tmp", "w", encoding="utf-8") as fh:
        for model, steps, temp in jobs:
            if model == "teacher":
                denoiser = teacher
            else:
                denoiser = IdealStudent(model, chain, teacher, steps, schedule, draws=args.draws, seed=args.seed,
                                        teacher_temperature=args.tau, sdtt_teacher_steps=args.sdtt_teacher_steps,
                                        groups=args.groups, continuation_steps=args.continuation_steps)
            res = ancestral_sample(denoiser, args.num_samples, seq_len, steps, V, schedule, args.seed,
                                   temperature=temp, batch_size=args.batch_size)
            extra = {"teacher": who} | ({} if model == "teacher" else
                                        {"draws": args.draws, "tau": args.tau, "trained_steps": steps}
                                        | ({"groups": args.groups, "continuation_steps": args.continuation_steps}
                                           if model == "mcd-ceiling" else {}))
            for ids in res.tokens.tolist():
                fh.write(json.dumps({"benchmark": "synthetic", "model": model, "round": 0, "steps": steps,
                                     "temperature": temp, "text": " ".join(map(str, ids)), "ids": ids,
                                     "nfe": res.nfe, "seconds_per_sample": res.seconds / args.num_samples}
                                    | extra) + "\n")
            fh.flush()
            if not args.quiet:
                print(f"ideal_rows: {model} @{steps} T={temp}: {args.num_samples} samples, "
                      f"{res.seconds / args.num_samples:.3f} s/sample", file=sys.stderr, flush=True)
    os.replace(args.out + ".tmp", args.out)
    print(f"ideal_rows: {len(jobs)} configurations -> {args.out} ({time.perf_counter() - start:.0f} s)")
    return 0
