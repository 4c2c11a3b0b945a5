"""tools/bench/stream.py runs end to end, the real distillation run included (not a timing assertion)."""
import json
import math

from tests.mp import load_script

bench = load_script("tools/bench/stream.py", "bench_stream")


def test_stream_bench_reports_the_data_wait_share_of_a_real_distillation_step(capsys):
    rc = bench.main(["--samples", "32", "--seq-len", "16", "--vocab", "61", "--hidden", "32", "--layers", "1",
                     "--top-k", "4", "--batch", "4", "--samples-per-shard", "16", "--read-samples", "16",
                     "--student-steps", "2", "--workers", "0", "--distill-steps", "3", "--distill-workers", "0",
                     "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["precompute_samples_per_s"] > 0 and out["student_samples_per_s"] > 0
    assert out["headroom_w"]["0"] == round(out["reader_samples_per_s"]["0"] / out["student_samples_per_s"], 2)
    d = out["distill_step"]
    assert d["exit_code"] == 0 and d["steps"] == 3  # one logged record per step of the trainer
    for key in ("data_wait_pct_steady", "data_wait_pct_max_steady", "data_wait_pct_step1"):
        assert math.isfinite(d[key]) and 0.0 <= d[key] <= 100.0, key
    assert d["data_wait_pct_steady"] <= d["data_wait_pct_max_steady"] and d["tokens_per_s"] > 0
