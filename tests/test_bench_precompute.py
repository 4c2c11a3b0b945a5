"""tools/bench/precompute.py runs and reports consistent figures (not a timing assertion)."""
import json
import math
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from tests.mp import load_script  # noqa: E402

bench = load_script("tools/bench/precompute.py", "bench_precompute")


def test_precompute_bench_prints_the_ratio_and_its_stages(capsys):
    rc = bench.main(["--samples", "24", "--seq-len", "16", "--vocab", "61", "--hidden", "32", "--layers", "1",
                     "--top-k", "4", "--batch", "8", "--samples-per-shard", "16", "--repeats", "2", "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)  # stdout holds the one JSON object, nothing else
    assert len(out["precompute_runs"]) == len(out["forward_runs"]) == 2
    assert all(v > 0 for v in out["precompute_runs"] + out["forward_runs"])
    assert out["ratio"] == pytest.approx(out["precompute_samples_per_s"] / out["forward_samples_per_s"], rel=1e-2)
    assert set(out["stages_s_per_sample"]) == {"times_and_thresholds", "forward", "topk", "pack", "write"}
    assert all(math.isfinite(v) and v >= 0 for v in out["stages_s_per_sample"].values())
    assert sum(out["stage_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert out["shard_bytes_per_sample"] > 0


def test_precompute_bench_bad_arguments_exit_2(capsys):
    assert bench.main(["--samples", "0"]) == 2
    assert bench.main(["--device", "gpu0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("bench: error:") for line in err)
