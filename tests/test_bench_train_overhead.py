"""tools/bench/train_overhead.py runs both layouts and reports consistent figures (not a timing assertion)."""
import json
import math

from tests.mp import load_script

bench = load_script("tools/bench/train_overhead.py", "bench_train_overhead")

TINY = ["--set", "model.hidden=32", "--set", "model.layers=1", "--set", "model.heads=2", "--set", "model.ffn_hidden=64",
        "--set", "model.seq_len=16", "--set", "model.vocab_size=61", "--set", "model.pad_vocab_multiple=8",
        "--micro-batch", "2"]


def test_train_overhead_bench_prints_side_by_side_figures(capsys):
    assert bench.main(TINY + ["--layouts", "0x1", "3x2", "--steps", "2", "--warmup", "1", "--profile", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["zero_stage"], r["ranks"]) for r in out["layouts"]] == [(0, 1), (3, 2)]
    for r in out["layouts"]:
        assert set(r["step_s"]) == {"ours", "deepspeed", "plain"} and all(v > 0 for v in r["step_s"].values())
        for key in ("ratio", "ratio_paired", "ratio_min", "ratio_vs_deepspeed", "deepspeed_vs_plain"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert abs(r["ratio"] - r["step_s"]["ours"] / r["step_s"]["plain"]) < 0.01 * r["ratio"] + 1e-3
        assert all(math.isfinite(v) for side in ("first_loss", "last_loss") for v in r[side].values())
        assert r["profile_ours_top_ops"] and r["profile_deepspeed_top_ops"]
    # One rank, same model, same prepared inputs: our engine and the bare one compute the same first loss.
    one = out["layouts"][0]
    assert one["first_loss"]["ours"] == one["first_loss"]["deepspeed"]


def test_train_overhead_bench_bad_layout_exits_2(capsys):
    assert bench.main(["--layouts", "3by2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--layouts" in err[0]
