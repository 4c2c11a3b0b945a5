#!/usr/bin/env python
"""Distil for the sampler's order: does an MCD student trained on strided-order trajectories
beat the strided teacher at a few steps, at matched entropy?

On a finished demo run (its synthetic teacher, data and exact chain), for a few-step budget n (default 4):

1. two MCD distillations with the demo's schedule (rounds, steps per round, trajectories per round, dt0 derived
   so the last round learns 1/n jumps): ``distill.reveal_order: strided`` with ``reveal_stride: n`` (the
   trajectories reveal one residue class per grid step, as the strided sampler does) and the default random
   order as the control;
2. samples: teacher@N (the demo's own files when present) and teacher@n with the default (ancestral) sampler
   at the demo's temperatures, teacher@n with the strided coupled sampler, and each student at n steps with
   the strided sampler (the random-order student with the default sampler too);
3. ``tools/evaluate.py`` once per student (each with the same teacher rows), exact NLL under the chain.

Prints one JSON object: per student and sampler, at each temperature, ``gap_closed`` (of the default
sampler's teacher@N vs teacher@n gap, at matched entropy) and ``gain_vs_same_sampler_nats`` (> 0: the student
beats its teacher drawn by the same sampler at the same steps: the question of this experiment), with the strided teacher's
own gap closed for reference. Every stage is skipped when its output exists (rerun to resume).

    .venv/bin/python experiments/strided_distill/strided_distill.py --demo runs/demo --out runs/strided_distill [--steps 4] [--times grid]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
BIN = os.path.dirname(sys.executable)
STRIDED = "coupled-strided"


def log(msg: str) -> None:
    print(f"[strided_distill {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def distill(args, plan, order: str) -> str:
    from mcd_scale.config import load_config
    from mcd_scale.distill.rounds import dt0_for_sampler_steps

    out = os.path.join(args.out, f"mcd_{order}{suffix(args)}")
    if os.path.exists(os.path.join(out, "DONE")):
        return out
    cfg = load_config([os.path.join(ROOT, "configs/demo/synthetic_teacher.yaml"),
                       os.path.join(ROOT, "configs/demo/distill.yaml")], []).distill
    dt0 = dt0_for_sampler_steps(cfg, "mcd", args.steps, plan.rounds)
    launcher = f"{os.path.join(BIN, 'torchrun')} --standalone --nproc_per_node {args.nproc}"
    sets = [f"data.path={os.path.join(args.demo, 'data', 'synthetic')}", f"model.seq_len={plan.syn_seq_len}",
            f"distill.dt0={dt0}", f"distill.steps_per_round={plan.distill_steps}",
            f"train.eval_every={max(plan.distill_steps // 2, 1)}", f"train.log_every={max(plan.distill_steps // 10, 1)}"]
    if order == "strided":
        sets += ["distill.reveal_order=strided", f"distill.reveal_stride={args.steps}"]
    if args.times == "grid":
        sets += ["distill.times=grid"]
    sets += args.set
    cmd = [sys.executable, "tools/distill_rounds.py", "--objective", "mcd", "--mode", "offline", "--rounds",
           str(plan.rounds), "--teacher", os.path.join(args.demo, "synthetic_teacher"), "--config",
           "configs/demo/synthetic_teacher.yaml", "configs/demo/distill.yaml", "--out", out, "--launcher", launcher,
           "--limit", str(plan.distill_limit)]
    for s in sets:
        cmd += ["--set", s]
    log(f"distill ({order} order, dt0 = {dt0}, {plan.rounds} rounds x {plan.distill_steps} steps)")
    t0 = time.time()
    with open(os.path.join(args.out, f"distill_{order}.log"), "w", encoding="utf-8") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"distill ({order}) exited {rc}; see {os.path.join(args.out, f'distill_{order}.log')}")
    log(f"distill ({order}) done in {time.time() - t0:.0f} s")
    open(os.path.join(out, "DONE"), "w").close()
    return out


def suffix(args) -> str:
    """Run/sample names of students trained on grid times (distill.times: grid) carry '_grid'."""
    return "_grid" if args.times == "grid" else ""


def last_student(run: str) -> str:
    """The run directory of the last round (DIR/round_n, the highest n with a complete checkpoint)."""
    import glob
    import re

    rounds = {int(re.search(r"round_(\d+)", p).group(1)): os.path.dirname(os.path.dirname(p))
              for p in glob.glob(os.path.join(run, "round_*", "checkpoints", "latest"))}
    if not rounds:
        raise SystemExit(f"{run}: no round has a complete checkpoint")
    return rounds[max(rounds)]


def sample_rows(args, plan, loaded, cache_name: str, model: str, steps: int, temperature: float, sampler: str,
                trained_steps=None) -> list[dict]:
    import sample as sample_cli  # tools/sample.py

    n = args.few_samples if (args.few_samples and steps != plan.many_steps) else plan.num_samples
    tag = f"_n{n}" if n != plan.num_samples else ""
    path = os.path.join(args.out, "samples", f"{cache_name}_s{steps}_T{temperature}_{sampler}{tag}.jsonl")
    demo_file = os.path.join(args.demo, "samples", f"synthetic_teacher_r0_s{steps}_T{temperature}.jsonl")
    if model == "teacher" and sampler == "ancestral" and os.path.exists(demo_file):
        path = demo_file  # the demo's own teacher samples (same seed, count and sampler)
    if not os.path.exists(path):
        how = dict(sampler="coupled", reveal_order="strided") if sampler == STRIDED else dict(sampler="ancestral")
        res = sample_cli.sample(loaded(), steps, n, seed=0, temperature=temperature,
                                batch_size=plan.sample_batch, **how)
        rows = [{"benchmark": "synthetic", "model": model, "round": 0, "steps": steps, "temperature": temperature,
                 "text": " ".join(map(str, ids.tolist())), "ids": ids.tolist(), "nfe": res.nfe,
                 "seconds_per_sample": res.seconds / n}
                | ({"sampler": sampler} if sampler != "ancestral" else {})
                | ({"trained_steps": trained_steps} if trained_steps else {}) for ids in res.tokens]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(path + ".tmp", path)
        log(f"sampled {os.path.basename(path)}: nfe {res.nfe:.1f}")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def lazy(checkpoint: str, weights: str = "model"):
    import sample as sample_cli

    box = {}

    def get():
        if "m" not in box:
            box["m"] = sample_cli.load_model(checkpoint, weights=weights)
        return box["m"]
    return get


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default=os.path.join(ROOT, "runs", "demo"), help="a finished tools/demo.py run")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "strided_distill"))
    ap.add_argument("--steps", type=int, default=4, help="the few-step budget n (= the strided order's stride)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--distill-only", action="store_true", help="stop after the two distillations")
    ap.add_argument("--orders", nargs="+", choices=("strided", "random"), default=["strided", "random"],
                    help="which students to distil (random alone: a training-budget study at the default order)")
    ap.add_argument("--steps-per-round", type=int, default=None, help="default: the demo's")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="one more distillation config override (repeatable), e.g. distill.temperature.schedule=off; "
                         "use a new --out per variant (the students' directories are named by order and times only)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="distillation rounds (default: the demo's 2; dt0 is derived so the last round learns 1/n)")
    ap.add_argument("--limit", type=int, default=None, help="trajectories precomputed per round (default: the demo's)")
    ap.add_argument("--few-samples", type=int, default=None,
                    help="samples per few-step configuration (default: the demo's 64; the teacher@N rows stay the "
                         "demo's): a few-step row costs little, and more of them narrow the same-sampler comparison")
    ap.add_argument("--times", choices=("uniform", "grid"), default="uniform",
                    help="distill.times of the students: uniform t, or the sampler's own grid steps")
    ap.add_argument("--weights", choices=("model", "ema"), default="model",
                    help="the students' weights to sample: the trained ones, or their EMA (needs --set "
                         "train.ema_decay=D; the next round's teacher is still the raw weights, docs/method.md section 5)")
    args = ap.parse_args()
    from mcd_scale.demo import make_plan  # the same sizes as the demo

    plan = make_plan(quick=False)
    if args.steps_per_round:
        plan.distill_steps = args.steps_per_round
    if args.limit:
        plan.distill_limit = args.limit
    if args.rounds:
        plan.rounds = args.rounds
    teacher_dir = os.path.join(args.demo, "synthetic_teacher")
    chain = os.path.join(args.demo, "data", "synthetic", "chain.json")
    for need in (teacher_dir, chain):
        if not os.path.exists(need):
            raise SystemExit(f"{need} does not exist: run tools/demo.py --out {args.demo} first")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    students = {order + suffix(args): last_student(distill(args, plan, order)) for order in args.orders}
    if args.distill_only:
        print(json.dumps({"students": students, "seconds": round(time.time() - t_start, 1)}))
        return 0
    teacher = lazy(teacher_dir)
    teacher_rows = []
    for t in plan.temperatures:
        teacher_rows += sample_rows(args, plan, teacher, "teacher", "teacher", plan.many_steps, t, "ancestral")
        teacher_rows += sample_rows(args, plan, teacher, "teacher", "teacher", args.steps, t, "ancestral")
        teacher_rows += sample_rows(args, plan, teacher, "teacher", "teacher", args.steps, t, STRIDED)
    result = {"steps": args.steps, "times": args.times, "weights": args.weights, "sets": args.set,
              "many_steps": plan.many_steps, "rounds": plan.rounds,
              "steps_per_round": plan.distill_steps, "trajectories_per_round": plan.distill_limit, "students": {}}
    temps = sorted(set(plan.student_temperatures) | {0.7})
    for order, run in students.items():
        student = lazy(run, args.weights)
        rows = list(teacher_rows)
        for t in temps:
            rows += sample_rows(args, plan, student, f"mcd_{order}", "mcd", args.steps, t, STRIDED, args.steps)
            if order.startswith("random"):
                rows += sample_rows(args, plan, student, f"mcd_{order}", "mcd", args.steps, t, "ancestral",
                                    args.steps)
        out = os.path.join(args.out, f"eval_{order}" + (f"_n{args.few_samples}" if args.few_samples else ""))
        os.makedirs(out, exist_ok=True)
        samples = os.path.join(out, "samples.jsonl")
        with open(samples, "w", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
        if not os.path.exists(os.path.join(out, "summary.json")):
            rc = subprocess.call([sys.executable, "tools/evaluate.py", "--samples", samples, "--out", out,
                                  "--synthetic-chain", chain, "--reference-samples", str(max(plan.num_samples, 64))],
                                 cwd=ROOT, stdout=subprocess.DEVNULL)
            if rc != 0:
                raise SystemExit(f"tools/evaluate.py exited {rc} on {samples}")
        summary = json.load(open(os.path.join(out, "summary.json"), encoding="utf-8"))["summary"]
        keep = ("model", "sampler", "temperature", "entropy", "quality", "gap_closed", "gap_closed_ci95",
                "gain_vs_same_sampler_nats", "gain_vs_same_sampler_ci95")
        result["students"][order] = [{k: s.get(k) for k in keep} for s in summary
                                     if s["steps"] == args.steps and s["benchmark"] == "synthetic"]
    result["seconds"] = round(time.time() - t_start, 1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
