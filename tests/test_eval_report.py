"""tools/evaluate.py + report end to end on a small chain, checked against independent computations."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

from mcd_scale.eval.report import ROW_KEYS, validate_row, write_report
from mcd_scale.eval.synthetic import MarkovChain2, oracle_ancestral_sample
from mcd_scale.eval.synthetic.prepare import prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from mcd_scale.eval import evaluate


def brute_entropy(row: list[int]) -> float:
    return -sum(row.count(v) / len(row) * math.log(row.count(v) / len(row)) for v in set(row))


def test_evaluate_synthetic_end_to_end(tmp_path):
    chain = MarkovChain2(16, branching=2, seed=1, fanout=4)
    chain_path = str(tmp_path / "chain.json")
    chain.save(chain_path)
    L, n = 32, 8
    runs = [("teacher", 0, 32, 1.0), ("teacher", 0, 32, 0.7), ("teacher", 0, 2, 1.0), ("teacher", 0, 2, 0.7),
            ("teacher", 0, 2, 0.4), ("mcd", 1, 2, 0.6)]
    lines, expected = [], {}
    for model, rnd, steps, temp in runs:
        # The "student" is the oracle at 8 steps posing as a 2-step model: a known, in-between quality.
        x, nfe = oracle_ancestral_sample(chain, n, L, 8 if model == "mcd" else steps, seed=3, temperature=temp)
        expected[(model, steps, temp)] = (float(chain.nll(x).mean()), float(np.mean([brute_entropy(r.tolist()) for r in x])))
        for r in x:
            lines.append(json.dumps({"benchmark": "synthetic", "model": model, "round": rnd, "steps": steps,
                                     "temperature": temp, "text": " ".join(map(str, r)), "nfe": steps,
                                     "seconds_per_sample": 0.01 * steps}))
    samples = tmp_path / "samples.jsonl"
    samples.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    assert evaluate.main(["--samples", str(samples), "--run-dir", str(run_dir), "--synthetic-chain", chain_path,
                          "--reference-samples", "64"]) == 0
    rows = json.loads((run_dir / "report.json").read_text())
    assert len(rows) == len(runs) and all(list(r) == list(ROW_KEYS) for r in rows)
    for r in rows:
        q, e = expected[(r["model"], r["steps"], r["temperature"])]
        # tolerance: the report copies float64 numbers through JSON (repr round-trips exactly); 1e-12 for safety
        assert r["quality"] == pytest.approx(q, rel=1e-12) and r["entropy"] == pytest.approx(e, rel=1e-12)
    summary = json.loads((run_dir / "summary.json").read_text())
    (student,) = summary["summary"]
    # tolerance: the same float64 computation redone here: approx default rel 1e-6
    assert summary["reference"]["synthetic"]["quality"] == pytest.approx(chain.nll(chain.sample(64, L, 1234)).mean())
    # Independent matched-entropy computation with np.interp on the teacher curves.
    def at(steps):
        pts = sorted((e, q) for (m, s, _), (q, e) in expected.items() if m == "teacher" and s == steps)
        es, qs = zip(*pts)
        return None if not es[0] <= student["entropy"] <= es[-1] else float(np.interp(student["entropy"], es, qs))
    many, few = at(32), at(2)
    assert many is not None and few is not None, "the fixed seeds put the student inside both teacher curves"
    q = expected[("mcd", 2, 0.6)][0]
    # tolerance: float64 ratios of differences of O(1) numbers: rounding ~1e-15 / (few - many); 1e-9
    assert student["gap_closed"] == pytest.approx((few - q) / (few - many), rel=1e-9)
    assert 0.5 < student["gap_closed"] < 1.0   # the 8-step oracle sits between the 2- and 32-step ones
    assert student["gain_vs_few_nats"] == pytest.approx(few - q, rel=1e-9)
    # evaluate.py hands the per-sample scores to the report: the summary carries bootstrap intervals
    lo, hi = student["gain_vs_few_ci95"]
    assert lo < student["gain_vs_few_nats"] < hi and 0.0 <= student["p_gain_positive"] <= 1.0
    # tolerance: ratios of exact inputs in float64: approx default
    assert student["speedup_nfe"] == pytest.approx(16.0) and student["speedup_seconds"] == pytest.approx(16.0)
    md = (run_dir / "report.md").read_text()
    assert "Matched-entropy summary" in md and "Reference (real held-out data" in md
    for name in ("frontier_synthetic.png", "steps_synthetic.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_text_path_with_ar_evaluator(tmp_path, capsys):
    # A prepared synthetic directory has the text data's layout: it stands in for tokenized text here.
    data = str(tmp_path / "data")
    prepare(data, 16, 2, 4, 0.5, 1e-6, 24, {"train": 4, "val": 16, "heldout": 64}, 7, 32)
    ids = MarkovChain2.load(os.path.join(data, "chain.json")).sample(6, 24, seed=9)
    lines = [json.dumps({"benchmark": "text", "model": "teacher", "round": 0, "steps": 24, "temperature": 1.0,
                         "text": "", "ids": r.tolist()}) for r in ids]
    (tmp_path / "s.jsonl").write_text("\n".join(lines))
    rc = evaluate.main(["--samples", str(tmp_path / "s.jsonl"), "--run-dir", str(tmp_path / "run"), "--data", data,
                        "--ar-evaluator", str(tmp_path / "ar"), "--train-ar-evaluator", "--ar-steps", "10"])
    assert rc == 0, capsys.readouterr().err
    (row,) = json.loads((tmp_path / "run" / "report.json").read_text())
    from mcd_scale.eval.ar_evaluator import AREvaluator
    want = math.exp(AREvaluator.load(str(tmp_path / "ar")).score(ids).mean())
    # tolerance: float64 exp/mean of the same numbers: rounding only
    assert row["quality_metric"] == "gen_ppl" and row["quality"] == pytest.approx(want, rel=1e-9)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["reference"]["text"]["quality"] > 1


def test_gain_over_the_same_step_teacher_is_a_log_ratio_for_gen_ppl():
    from mcd_scale.eval.report import summarize
    base = {"benchmark": "text", "round": 0, "quality_metric": "gen_ppl", "nfe": 16, "seconds_per_sample": 0.1,
            "evaluator": "x"}
    rows = [{**base, "model": "teacher", "steps": 256, "temperature": t, "entropy": e, "quality": q, "nfe": 100}
            for t, e, q in ((0.7, 3.0, 400.0), (1.0, 4.0, 3000.0))]
    rows += [{**base, "model": "teacher", "steps": 16, "temperature": t, "entropy": e, "quality": q}
             for t, e, q in ((0.7, 3.0, 420.0), (1.0, 4.0, 3200.0))]
    rows.append({**base, "model": "mcd", "round": 2, "steps": 16, "temperature": 1.0, "entropy": 3.5, "quality": 1000.0})
    (s,) = summarize(rows)
    # The 16-step teacher curve read at entropy 3.5 in nats (log Gen PPL), not on the convex PPL scale:
    few = math.exp(0.5 * (math.log(420.0) + math.log(3200.0)))
    # tolerance (this block): float64 interpolation and logs of exact inputs: approx default or 1e-12 (rounding only)
    assert s["teacher_few_quality"] == pytest.approx(few) and few < 420.0 + 0.5 * (3200.0 - 420.0)
    many = math.exp(0.5 * (math.log(400.0) + math.log(3000.0)))
    assert s["gap_closed"] == pytest.approx((math.log(few) - math.log(1000.0)) / (math.log(few) - math.log(many)))
    assert s["gain_vs_few_nats"] == pytest.approx(math.log(few / 1000.0), rel=1e-12) and s["gain_vs_few_nats"] > 0
    with pytest.raises(ValueError, match="mixes quality metrics"):
        summarize(rows + [{**rows[0], "quality_metric": "true_nll"}])


def test_bad_rows_and_inputs_are_named(tmp_path, capsys):
    good = {"benchmark": "text", "model": "mcd", "round": 1, "steps": 16, "temperature": 1.0, "quality": 50.0,
            "quality_metric": "gen_ppl", "entropy": 4.0, "nfe": 16, "seconds_per_sample": 0.1, "evaluator": "x"}
    validate_row(good)
    with pytest.raises(ValueError, match="quality_metric"):
        validate_row({**good, "quality_metric": "true_nll"})
    with pytest.raises(ValueError, match="missing"):
        write_report([{k: v for k, v in good.items() if k != "nfe"}], str(tmp_path))
    (tmp_path / "bad.jsonl").write_text('{"benchmark": "synthetic"}\n')
    assert evaluate.main(["--samples", str(tmp_path / "bad.jsonl"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "bad.jsonl:1: missing field" in capsys.readouterr().err


def _sampler_rows():
    """Default-sampler teacher curves (lines in entropy), a strided teacher@16 curve and two students."""
    base = {"benchmark": "synthetic", "round": 0, "quality_metric": "true_nll", "nfe": 16,
            "seconds_per_sample": 0.1, "evaluator": "x"}
    rows = [{**base, "model": "teacher", "steps": 256, "temperature": t, "entropy": e, "quality": q, "nfe": 160}
            for t, e, q in ((0.7, 3.0, 1.0), (1.0, 4.0, 2.0))]
    rows += [{**base, "model": "teacher", "steps": 16, "temperature": t, "entropy": e, "quality": q}
             for t, e, q in ((0.7, 3.0, 2.0), (1.0, 4.0, 3.0))]
    rows += [{**base, "model": "teacher", "steps": 16, "temperature": t, "entropy": e, "quality": q,
              "sampler": "coupled-strided"} for t, e, q in ((0.7, 3.0, 0.9), (1.0, 4.0, 1.9))]
    rows.append({**base, "model": "mcd", "round": 2, "steps": 16, "temperature": 1.0, "entropy": 3.5, "quality": 1.6,
                 "sampler": "coupled-strided"})
    rows.append({**base, "model": "mcd", "round": 2, "steps": 16, "temperature": 1.0, "entropy": 3.5, "quality": 2.2})
    return rows


def test_a_second_sampler_is_measured_against_the_default_gap_and_its_own_teacher():
    from mcd_scale.eval.report import config_key, summarize
    rows = _sampler_rows()
    summary = {(s["model"], s["sampler"], s["temperature"]): s for s in summarize(rows)}
    assert len(summary) == 4  # both strided teacher rows (the sampler alone) and both students
    # At entropy 3.5: teacher@256 1.5, default teacher@16 2.5, strided teacher@16 1.4.
    st = summary[("mcd", "coupled-strided", 1.0)]
    # tolerance (this block): float64 differences/ratios of decimal inputs (not exact in binary): approx default
    assert st["gap_closed"] == pytest.approx((2.5 - 1.6) / (2.5 - 1.5))
    assert st["gain_vs_few_nats"] == pytest.approx(2.5 - 1.6)
    assert st["gain_vs_same_sampler_nats"] == pytest.approx(1.4 - 1.6)  # below the teacher sampled the same way
    anc = summary[("mcd", "ancestral", 1.0)]
    assert anc["gap_closed"] == pytest.approx(0.3) and anc["gain_vs_same_sampler_nats"] == pytest.approx(0.3)
    t = summary[("teacher", "coupled-strided", 1.0)]
    assert t["gap_closed"] == pytest.approx((3.0 - 1.9) / (3.0 - 2.0)) and math.isnan(t["gain_vs_same_sampler_nats"])
    # a default-sampler row keeps the 5-field key and schema; another sampler extends both
    assert config_key(rows[-1]) == ("synthetic", "mcd", 2, 16, 1.0)
    assert config_key(rows[-2]) == ("synthetic", "mcd", 2, 16, 1.0, "coupled-strided")
    assert set(validate_row(rows[-1])) == set(ROW_KEYS)
    assert validate_row(rows[-2])["sampler"] == "coupled-strided"
    assert set(validate_row({**rows[-1], "sampler": "ancestral"})) == set(ROW_KEYS)
    with pytest.raises(ValueError, match="sampler 'strided' is not one of"):
        validate_row({**rows[-1], "sampler": "strided"})


def test_report_with_two_samplers_renders_both_and_evaluate_keeps_them_apart(tmp_path):
    out = write_report(_sampler_rows(), str(tmp_path / "r"))
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| coupled-strided |" in md and "vs teacher@n same sampler" in md
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert sum(r.get("sampler") == "coupled-strided" for r in saved) == 3 and len(saved) == 8
    assert all(os.path.exists(p) for p in out["plots"])
    # evaluate.py: the same (model, round, steps, temperature) under two samplers = two report rows
    chain = MarkovChain2(16, branching=2, seed=1, fanout=4)
    chain.save(str(tmp_path / "chain.json"))
    x = chain.sample(4, 16, seed=0)
    lines = []
    for sampler in (None, "coupled-strided"):
        for model, steps in (("teacher", 16), ("teacher", 2), ("mcd", 2)):
            for i, ids in enumerate(x):
                row = {"benchmark": "synthetic", "model": model, "round": int(model == "mcd"), "steps": steps,
                       "temperature": 1.0, "text": " ".join(map(str, ids[::-1] if sampler else ids)),
                       "nfe": steps, "seconds_per_sample": 0.01}
                lines.append(json.dumps(row if sampler is None or steps == 16 else {**row, "sampler": sampler}))
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    assert evaluate.main(["--samples", str(tmp_path / "s.jsonl"), "--run-dir", str(tmp_path / "e"),
                          "--synthetic-chain", str(tmp_path / "chain.json"), "--reference-samples", "4"]) == 0
    rows = json.loads((tmp_path / "e" / "report.json").read_text())
    by = {(r["model"], r["steps"], r.get("sampler", "ancestral")): r for r in rows}
    assert len(rows) == len(by) == 5
    # the strided rows hold the reversed sequences: scored on their own, not pooled with the default rows
    assert float(chain.nll(x[:, ::-1]).mean()) > float(chain.nll(x).mean()) + 1.0
    # tolerance: the same float64 NLL computed twice: approx default
    assert by[("mcd", 2, "coupled-strided")]["quality"] == pytest.approx(float(chain.nll(x[:, ::-1]).mean()))
    assert by[("mcd", 2, "ancestral")]["quality"] == pytest.approx(float(chain.nll(x).mean()))
    (tmp_path / "bad.jsonl").write_text(lines[0][:-1] + ', "sampler": "strided"}\n')
    assert evaluate.main(["--samples", str(tmp_path / "bad.jsonl"), "--run-dir", str(tmp_path / "b"),
                          "--synthetic-chain", str(tmp_path / "chain.json")]) == 2


def test_same_sampler_interval_reads_the_teacher_of_the_students_sampler():
    """With identical samples per configuration every bootstrap draw is the point estimate, so each
    interval must collapse onto its own figure: the strided student's same-sampler interval on
    1.4 − 1.6 (strided teacher), not on 2.5 − 1.6 (ancestral teacher)."""
    from mcd_scale.eval.bootstrap import SampleScores
    from mcd_scale.eval.report import config_key, summarize
    rows = _sampler_rows()
    per = {config_key(r): SampleScores(np.full(20, r["quality"]), np.full(20, 100.0), np.full(20, r["entropy"]))
           for r in rows}
    summary = {(s["model"], s["sampler"]): s for s in summarize(rows, per, bootstrap_draws=20)}
    st = summary[("mcd", "coupled-strided")]
    # tolerance (this block): percentiles of constant float64 differences: approx default
    assert st["gain_vs_same_sampler_ci95"] == pytest.approx([-0.2, -0.2])
    assert st["gain_vs_few_ci95"] == pytest.approx([0.9, 0.9]) and st["gap_closed_ci95"] == pytest.approx([0.9, 0.9])
    assert summary[("mcd", "ancestral")]["gain_vs_same_sampler_ci95"] == pytest.approx([0.3, 0.3])
    assert summary[("teacher", "coupled-strided")]["gain_vs_same_sampler_ci95"] is None
