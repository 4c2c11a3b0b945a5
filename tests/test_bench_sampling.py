"""tools/bench/sampling.py runs and reports consistent figures (not a timing assertion)."""
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from tests.mp import load_script  # noqa: E402

bench = load_script("tools/bench/sampling.py", "bench_sampling")


def test_sampling_bench_prints_side_by_side_figures(capsys):
    rc = bench.main(["--config", "configs/tiny/teacher.yaml", "--set", "model.seq_len=16", "--set", "model.layers=1",
                     "--many-steps", "32", "--num-samples", "4", "--batch-sizes", "2", "4", "--repeats", "1"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["many_steps"], out["few_steps"], out["seq_len"]) == (32, 2, 16)
    assert out["nfe_student"] == 2.0  # every row reveals something at each of 2 steps
    # Caching: at most one call per step, never more calls than tokens + tail.
    assert 2.0 < out["nfe_teacher"] <= 16 + 1
    # tolerance: the JSON fields are rounded for printing (4-5 significant digits); 1e-3 covers that rounding
    assert out["speedup_nfe"] == pytest.approx(out["nfe_teacher"] / 2.0, rel=1e-3)
    assert set(out["per_batch_size"]) == {"2", "4"}
    for v in out["per_batch_size"].values():
        assert v["teacher_s_per_sample"] > 0 and v["student_s_per_sample"] > 0
        # (the printed times are rounded to 5 digits, the ratio is taken before rounding)
        assert v["speedup_wall"] == pytest.approx(v["teacher_s_per_sample"] / v["student_s_per_sample"], rel=1e-2)
        assert v["speedup_wall_paired"] > 0 and v["speedup_wall_min"] > 0
    # One timed pair per chunk of batch-size samples per repeat: 4 samples in chunks of 2, then of 4.
    assert out["per_batch_size"]["2"]["pairs"] == 2 and out["per_batch_size"]["4"]["pairs"] == 1
    # The strided few-step side and the AR reference ran in the same groups; tokens/s is L / (s per sample).
    assert out["nfe_student_strided"] == 2.0
    assert out["ar_model"]["nfe"] == 16 and out["ar_model"]["kv_cache"] is True
    for v in out["per_batch_size"].values():
        for side in ("teacher", "student", "student_strided", "ar"):
            assert v[f"{side}_tokens_per_s"] == pytest.approx(16 / v[f"{side}_s_per_sample"], rel=1e-2)
        assert v["student_vs_ar"] == pytest.approx(v["ar_s_per_sample"] / v["student_s_per_sample"], rel=1e-2)
        assert v["speedup_wall_strided"] > 0


def test_sampling_bench_few_steps_strided(capsys):
    rc = bench.main(["--config", "configs/tiny/teacher.yaml", "--set", "model.seq_len=16", "--set", "model.layers=1",
                     "--many-steps", "32", "--few-steps", "4", "--few-reveal-order", "strided", "--num-samples", "4",
                     "--batch-sizes", "4", "--repeats", "1", "--no-ar"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["few_steps"], out["few_reveal_order"]) == (4, "strided")
    assert "ar_model" not in out and "ar_s_per_sample" not in out["per_batch_size"]["4"]
    assert out["nfe_student"] == 4.0  # stride 4 at L = 16: each step reveals one residue class in every row
    assert "nfe_student_strided" not in out  # the few-step side is strided already: no second strided side
    assert bench.main(["--config", "configs/tiny/teacher.yaml", "--set", "model.seq_len=16", "--many-steps", "8",
                       "--few-steps", "8"]) == 2


def test_sampling_bench_bad_device_exits_2(capsys):
    assert bench.main(["--config", "configs/tiny/teacher.yaml", "--device", "gpu0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device" in err[0]


def test_large_vocab_row_reports_ours_against_the_bare_draw(capsys):
    """--large-vocab: our per-step sampler work against softmax + multinomial on the same logits (shape only
    here; the V = 50,257 figure is measured by the bench itself, docs/performance.md)."""
    rc = bench.main(["--large-vocab", "--vocab", "300", "--length", "16", "--repeats", "1", "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["vocab_size"], out["seq_len"], out["target_ratio"]) == (300, 16, 1.2)
    assert out["all_positions"]["reveals_per_step"] == 16 and out["steps_16"]["reveals_per_step"] == 1
    for key in ("all_positions", "steps_16"):
        assert out[key]["ours_s_per_step"] > 0
        assert out[key]["ratio_vs_bare"] == pytest.approx(out[key]["ours_s_per_step"]
                                                          / out["bare_softmax_multinomial_s"], rel=1e-2, abs=2e-3)
    assert out["meets_target"] == (out["all_positions"]["ratio_vs_bare"] <= 1.2)
