"""Run the rounds of a distillation (MCD, or the SDTT baseline): round n's student is round n+1's teacher.

    python tools/distill_rounds.py --teacher runs/tiny_teacher --config configs/tiny/distill.yaml \\
        --out runs/tiny_distill [--rounds 3] [--mode offline|online] [--objective mcd|sdtt] \\
        [--launcher "deepspeed --num_gpus 2" | "torchrun --nproc_per_node 2" | "python"] [--set k=v ...]

For each round n = 0 .. rounds-1 (DIR = --out; the old spelling --run-dir still works):
1. offline MCD only: ``tools/precompute_trajectories.py --teacher T_n --data <data.path>
   --out DIR/round_n/trajectories --round n`` (same configs and --set), under the same launcher; not
   relaunched when that directory holds a finished set (its manifest.json), which the trainer checks;
2. ``mcd_scale/train.py`` with ``train.objective``, ``distill.teacher_mode``, ``distill.round=n``,
   ``distill.teacher=T_n``, ``run.dir=DIR/round_n``, ``data.trajectories`` and
   ``train.steps=distill.steps_per_round``;
3. T_{n+1} = DIR/round_n/checkpoints/latest/model.safetensors (the student's raw weights, not EMA:
   docs/method.md section 5).

T_0 is --teacher (a run dir, checkpoint dir or model.safetensors), resolved to its file. A per-round
summary (final training loss, last validation NELBO, seconds) is printed and DIR/rounds.json rewritten
after every round; a round already recorded as done there (same teacher file) is skipped on a re-run,
and an unfinished one resumes from its own checkpoints (the trainer's checkpoint.load: latest).
A failing child stops the driver, which exits with the child's exit code.

Preemption (SIGUSR1/SIGTERM, e.g. from slurm/distill_1b.sh): passed on to the running child, which saves at
its next step / shard boundary and exits 4; the driver starts no further child and exits 4.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time

from mcd_scale.checkpoint.integrity import verify_file
from mcd_scale.cli import ArgumentParser, add_config_args, add_out_arg, fail, input_errors
from mcd_scale.config import ConfigError, load_config
from mcd_scale.signals import PreemptionFlag, run_entry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The checkout: each round runs its entry points (tools/precompute_trajectories.py, mcd_scale/train.py) as programs."""


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="tools/distill_rounds.py", description=__doc__)
    p.add_argument("--teacher", required=True, help="round-0 teacher: run dir, checkpoint dir or model.safetensors")
    add_config_args(p, required=True, set_help="config override passed to every child (repeatable)")
    add_out_arg(p, required=True, help="output: DIR/round_n/..., DIR/rounds.json")
    p.add_argument("--rounds", type=int, default=None, help="number of rounds (default: distill.rounds)")
    p.add_argument("--mode", choices=("offline", "online"), default=None,
                   help="MCD teacher mode (default: distill.teacher_mode); SDTT is always online")
    p.add_argument("--objective", choices=("mcd", "sdtt"), default="mcd")
    p.add_argument("--launcher", default="python",
                   help='how to start a child: "python", "torchrun --nproc_per_node 2", "deepspeed --num_gpus 2"')
    p.add_argument("--limit", type=int, default=None, help="precompute only the first N train samples")
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help="trajectory shard size passed to the precompute (default: the tool's); a resumed or "
                        "separately precomputed round must use the same value")
    return p.parse_args(argv)


def launcher_argv(launcher: str) -> list[str]:
    argv = shlex.split(launcher)
    if not argv:
        raise SystemExit("--launcher is empty")
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable  # the driver's interpreter (the project's venv)
    return argv


def _sets(items) -> list[str]:
    out: list[str] = []
    for item in items:
        out += ["--set", item]
    return out


class _Preemption(PreemptionFlag):
    """SIGUSR1/SIGTERM to the driver: passed on to the running child (which saves at its next boundary and
    exits 4); no further child is started, and the driver exits 4 so the SLURM script requeues."""

    def __init__(self):
        self.child: "subprocess.Popen | None" = None  # before the handlers are installed: they read it
        super().__init__()

    def _handler(self, signum, frame):
        super()._handler(signum, frame)
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def check(self) -> None:
        if self.requested:
            print("[distill_rounds] preemption signal: not starting the next child; exiting 4 (rerun to resume)",
                  file=sys.stderr, flush=True)
            raise SystemExit(4)


def run_child(cmd: list[str], label: str, preemption: "_Preemption | None" = None) -> float:
    if preemption is not None:
        preemption.check()
    print(f"[distill_rounds] {label}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.time()
    child = subprocess.Popen(cmd, cwd=REPO)
    if preemption is not None:
        preemption.child = child
    rc = child.wait()
    if preemption is not None:
        preemption.child = None  # a signal after a clean exit stops the driver before the next child
        if preemption.requested and (rc < 0 or rc > 128):
            # Killed by the preemption signal itself (still starting, before its handler was installed):
            # checkpoints and shards are only published complete, so a rerun resumes as after an exit 4.
            print(f"[distill_rounds] {label} ended by signal ({rc}) after a preemption signal: exiting 4",
                  file=sys.stderr, flush=True)
            rc = 4
    if rc != 0:
        print(f"[distill_rounds] {label} failed with exit code {rc}; stopping (rerun to resume)", file=sys.stderr,
              flush=True)
        raise SystemExit(rc)
    return time.time() - t0


def round_metrics(run_dir: str) -> dict:
    """Last training loss and last validation NELBO from metrics.jsonl (None when absent)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    loss = nelbo = None
    step = 0
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                row = json.loads(line)
                if row.get("split") == "train" and row.get("loss") is not None:
                    loss, step = float(row["loss"]), int(row["step"])
                elif row.get("split") == "val" and row.get("nelbo") is not None:
                    nelbo = float(row["nelbo"])
    return {"loss": loss, "val_nelbo": nelbo, "last_logged_step": step}


def main(argv=None, process_entry: bool = False) -> int:
    """Run the rounds: exit 0 (done), 2 (bad input), 4 (preempted: rerun to resume), or a child's failing code.

    The preemption handlers are installed before the input checks, which hash the teacher file (seconds for a
    1B teacher): a warning signal then stops the driver before its first child (exit 4), where USR1's default
    action would have killed it (exit 138). As the process entry (``process_entry``: tools/distill_rounds.py)
    they stay installed until exit; an in-process caller gets its previous handlers back (:func:`run_entry`)."""
    args = parse_args(argv)
    return run_entry(lambda preemption: _run(args, preemption), process_entry, _Preemption())


def _run(args, preemption: _Preemption) -> int:
    # lazy: loads torch; importing this module does not need it
    from mcd_scale.distill.checkpoints import resolve_teacher_file
    from mcd_scale.distill.rounds import plan_rounds

    try:  # the inputs before any child starts: one line, exit 2
        cfg = load_config(args.config, args.overrides)
        d = cfg.distill
        mode = "online" if args.objective == "sdtt" else (args.mode or d.teacher_mode)
        n_rounds = args.rounds if args.rounds is not None else d.rounds
        if n_rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {n_rounds}")
        plans = plan_rounds(dataclasses.replace(d, rounds=n_rounds), cfg.diffusion.t_min)
        teacher = os.path.abspath(resolve_teacher_file(args.teacher, what="--teacher"))
        verify_file(teacher)  # a truncated/altered teacher now, not after the first child started (streamed sha256)
    except input_errors(ValueError, FileNotFoundError) as exc:
        return fail("distill_rounds", exc)
    launch = launcher_argv(args.launcher)
    run_dir = os.path.abspath(args.out)
    os.makedirs(run_dir, exist_ok=True)
    summary_path = os.path.join(run_dir, "rounds.json")
    previous = {}
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as fh:
            previous = {r["round"]: r for r in json.load(fh).get("rounds", [])}
    record = {"objective": args.objective, "mode": mode, "config": args.config, "overrides": args.overrides,
              "launcher": args.launcher, "initial_teacher": teacher, "rounds": []}

    for plan in plans:
        n = plan.round
        rdir = os.path.join(run_dir, f"round_{n}")
        done = previous.get(n)
        if done and done.get("status") == "done" and done.get("teacher") == teacher \
                and os.path.isfile(done.get("student", "")):
            print(f"[distill_rounds] round {n}: already done ({done['student']}), skipping", flush=True)
            record["rounds"].append(done)
            teacher = done["student"]
            continue
        entry = {"round": n, "dt": plan.dt, "temperature": plan.temperature, "steps": plan.steps,
                 "teacher": teacher, "run_dir": rdir}
        traj = ""
        precompute_s = 0.0
        if args.objective == "mcd" and mode == "offline":
            traj = os.path.join(rdir, "trajectories")
        if traj and os.path.isfile(os.path.join(traj, "manifest.json")):
            # A finished set (precompute writes the manifest last), e.g. a requeued job or the precompute job
            # run ahead: not relaunched (it would load the teacher on every rank to skip every shard). The
            # trainer's reader still checks it against the config, the teacher's sha256 and the tokenizer.
            print(f"[distill_rounds] round {n} precompute: {traj} is complete, not relaunched", flush=True)
        elif traj:
            cmd = launch + [os.path.join(REPO, "tools/precompute_trajectories.py"), "--teacher", teacher,
                            "--data", cfg.data.path, "--out", traj, "--round", str(n), "--no-progress"]
            for f in args.config:
                cmd += ["--config", f]
            cmd += _sets(args.overrides + [f"distill.round={n}"])
            if args.limit is not None:
                cmd += ["--limit", str(args.limit)]
            if args.samples_per_shard is not None:
                cmd += ["--samples-per-shard", str(args.samples_per_shard)]
            precompute_s = run_child(cmd, f"round {n} precompute", preemption)
        sets = list(args.overrides) + [f"train.objective={args.objective}", f"distill.teacher_mode={mode}",
                                       f"distill.round={n}", f"distill.teacher={teacher}", f"run.dir={rdir}",
                                       f"train.steps={plan.steps}"]
        if traj:
            sets.append(f"data.trajectories={traj}")
        cmd = launch + [os.path.join(REPO, "mcd_scale/train.py"), "--config", *args.config] + _sets(sets)
        train_s = run_child(cmd, f"round {n} train", preemption)
        student = os.path.abspath(resolve_teacher_file(rdir, what=f"round {n} student"))
        entry.update(round_metrics(rdir), student=student, precompute_s=round(precompute_s, 2),
                     train_s=round(train_s, 2), seconds=round(precompute_s + train_s, 2), status="done")
        record["rounds"].append(entry)
        with open(summary_path + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2)
        os.replace(summary_path + ".tmp", summary_path)
        teacher = student

    print("[distill_rounds] summary")
    print(f"{'round':>5} {'dt':>9} {'tau':>5} {'steps':>6} {'loss':>9} {'val NELBO':>10} {'seconds':>8}")
    for r in record["rounds"]:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{r['round']:>5} {r['dt']:>9.5f} {r['temperature']:>5.2f} {r['steps']:>6} {fmt(r.get('loss'), '9.4f')} "
              f"{fmt(r.get('val_nelbo'), '10.4f')} {fmt(r.get('seconds'), '8.1f')}")
    print(f"[distill_rounds] final student: {teacher}\n[distill_rounds] wrote {summary_path}", flush=True)
    return 0
