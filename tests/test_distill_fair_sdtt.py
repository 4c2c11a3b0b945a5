"""Fair SDTT: every objective's last round learns the jump its student is sampled with (docs/method.md section 5),
the step count a student was distilled for is read back from its checkpoint, and the demo / evaluate
refuse or flag a student sampled at another step count."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mcd_scale.config import Config, DistillConfig, to_yaml
from mcd_scale.distill.rounds import (checkpoint_trained_steps, dt0_for_sampler_steps, plan_rounds, round_dt,
                                      student_jump, trained_sampler_steps)
from mcd_scale import demo
from mcd_scale.eval.synthetic import MarkovChain2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _d(**kw) -> DistillConfig:
    return dataclasses.replace(DistillConfig(), **kw)


@pytest.mark.parametrize("quick", [False, True])
def test_demo_last_round_jump_equals_sampling_jump_for_both_objectives(quick):
    plan = demo.make_plan(quick)
    for bench in plan.distill_benchmarks:
        cfg = plan.distill_config(bench)
        jumps = {}
        for objective in ("mcd", "sdtt"):
            rounds, dt0, _ = plan.distill_schedule(bench, objective)
            d = dataclasses.replace(cfg, dt0=dt0, rounds=rounds)
            last = plan_rounds(d)[-1]
            # The jump is the teacher's dt times the teacher steps it replaces: 1 for MCD, 2 for SDTT.
            k = 1 if objective == "mcd" else cfg.sdtt_teacher_steps
            jumps[objective] = last.dt * k
            assert jumps[objective] == pytest.approx(1.0 / plan.few_steps, rel=1e-12), (bench, objective)
            assert trained_sampler_steps(dataclasses.replace(d, round=last.round), objective) == plan.few_steps
        assert jumps["sdtt"] == pytest.approx(jumps["mcd"], rel=1e-12)
        # SDTT's teacher takes 2 steps, so its dt0 is half MCD's (the unfair demo gave both MCD's).
        assert plan.distill_schedule(bench, "sdtt")[1] == pytest.approx(plan.distill_schedule(bench, "mcd")[1] / 2)


@pytest.mark.parametrize("growth", ["double", "linear"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_dt0_for_sampler_steps_inverts_the_round_schedule(growth, k):
    for steps, rounds in ((16, 2), (8, 3), (4, 1)):
        base = _d(dt_growth=growth, sdtt_teacher_steps=k)
        for objective in ("mcd", "sdtt"):
            d = dataclasses.replace(base, dt0=dt0_for_sampler_steps(base, objective, steps, rounds), rounds=rounds)
            jump = round_dt(d, rounds - 1) * (k if objective == "sdtt" else 1)
            assert jump == pytest.approx(1.0 / steps, rel=1e-12)
            assert student_jump(d, rounds - 1, objective) == pytest.approx(jump, rel=1e-12)


def test_trained_steps_of_a_config_and_a_teacher():
    d = _d(dt0=1 / 32, round=1, sdtt_teacher_steps=2)
    assert trained_sampler_steps(d, "mcd") == 16
    assert trained_sampler_steps(d, "sdtt") == 8  # the old demo's SDTT: 1/8 jumps, sampled at 16
    assert trained_sampler_steps(d, "mcd", n=0) == 32
    assert trained_sampler_steps(_d(dt0=0.3), "mcd") is None  # 1/0.3 is not a whole step count
    cfg = Config()
    cfg.train.objective = "mdlm"
    assert checkpoint_trained_steps(cfg) is None
    cfg.train.objective, cfg.distill = "sdtt", d
    assert checkpoint_trained_steps(cfg) == 8
    with pytest.raises(ValueError, match="objective"):
        trained_sampler_steps(d, "dcd")


def _fake_student(run: str, objective: str, dt0: float, rnd: int) -> None:
    """A student run dir as tools/distill_rounds.py leaves it: checkpoints/latest -> a tag with the
    resolved config (the record of what it was distilled for) and weights."""
    cfg = Config()
    cfg.train.objective = objective
    cfg.distill = _d(dt0=dt0, round=rnd, sdtt_teacher_steps=2)
    tag = os.path.join(run, "checkpoints", "step_000010")
    os.makedirs(tag)
    with open(os.path.join(tag, "config.resolved.yaml"), "w") as fh:
        fh.write(to_yaml(cfg))
    for name in ("model.safetensors", "COMPLETE"):
        open(os.path.join(tag, name), "w").close()
    with open(os.path.join(run, "checkpoints", "latest"), "w") as fh:
        fh.write("step_000010")


def test_demo_refuses_a_last_round_distilled_for_another_step_count(tmp_path, monkeypatch, capsys):
    plan = dataclasses.replace(demo.make_plan(False), distill_benchmarks=("synthetic",))
    d = demo.Demo(str(tmp_path / "run"), plan, "torchrun", 2)
    _fake_student(os.path.join(d.distill_dir("synthetic", "mcd"), "round_1"), "mcd", 1 / 32, 1)  # 16 steps
    _fake_student(os.path.join(d.distill_dir("synthetic", "sdtt"), "round_0"), "sdtt", 1 / 64, 0)  # 32 steps
    _fake_student(os.path.join(d.distill_dir("synthetic", "sdtt"), "round_1"), "sdtt", 1 / 64, 1)  # 16 steps
    jobs = d.sample_jobs()
    students = [j for j in jobs if j["model"] != "teacher"]
    assert {(j["model"], j["round"], j["trained_steps"]) for j in students} == {("mcd", 2, 16), ("sdtt", 1, 32),
                                                                              ("sdtt", 2, 16)}
    assert all(j["steps"] == plan.few_steps for j in students)
    # The old demo's SDTT: MCD's dt0 with 2 teacher steps -> trained for 8 steps, sampled at 16: refused.
    old = os.path.join(d.distill_dir("synthetic", "sdtt"), "round_1")
    import shutil
    shutil.rmtree(old)
    _fake_student(old, "sdtt", 1 / 32, 1)
    with pytest.raises(demo.DemoInputError, match="distilled for 8 sampler steps.*samples it at 16"):
        d.sample_jobs()
    # main turns it into exit 2 and one line on stderr.
    monkeypatch.setattr(demo.Demo, "main", lambda self: self.sample_jobs())
    monkeypatch.setattr(demo, "make_plan", lambda quick: plan)
    assert demo.main(["--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("demo: error:") and "distilled for 8" in err[0]


def _rows(chain: MarkovChain2, **extra) -> list[str]:
    ids = chain.sample(4, 12, seed=3)
    return [json.dumps({"benchmark": "synthetic", "temperature": 1.0, "ids": row.tolist(), "nfe": 3.0,
                        "seconds_per_sample": 0.01, **extra}) for row in ids]


def _evaluate(tmp_path, lines: list[str]) -> subprocess.CompletedProcess:
    chain = MarkovChain2(16, branching=2, seed=1, fanout=4)
    chain.save(str(tmp_path / "chain.json"))
    (tmp_path / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--samples",
                           str(tmp_path / "samples.jsonl"), "--run-dir", str(tmp_path / "out"), "--synthetic-chain",
                           str(tmp_path / "chain.json"), "--reference-samples", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_evaluate_flags_students_sampled_off_their_schedule_and_rejects_bad_field(tmp_path):
    chain = MarkovChain2(16, branching=2, seed=1, fanout=4)
    teacher = [_rows(chain, model="teacher", round=0, steps=s) for s in (16, 4)]
    on = _rows(chain, model="mcd", round=2, steps=4, trained_steps=4)
    off = _rows(chain, model="sdtt", round=2, steps=4, trained_steps=2)
    r = _evaluate(tmp_path, sum(teacher, []) + on + off)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Off-schedule students" in md
    assert "synthetic sdtt round 2 sampled at 4 steps (ancestral) was distilled for [2] steps" in md
    assert "mcd round 2" not in md.split("## Off-schedule students")[1]
    assert "off-schedule: synthetic sdtt round 2" in r.stderr
    # report.json keeps its schema (trained_steps is an input field, not a report column)
    rows = json.loads((tmp_path / "out" / "report.json").read_text())
    assert all("trained_steps" not in row for row in rows)

    r = _evaluate(tmp_path, sum(teacher, []) + on)
    assert r.returncode == 0 and "Off-schedule" not in (tmp_path / "out" / "report.md").read_text()

    r = _evaluate(tmp_path, sum(teacher, []) + _rows(chain, model="mcd", round=2, steps=4, trained_steps="16"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "trained_steps must be a positive integer" in r.stderr
