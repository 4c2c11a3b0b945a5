"""tools/bench/prepare.py runs end to end at a tiny size (no 4x corpus) and reports consistent figures (not a timing
assertion)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.data_fixtures import smollm2_tokenizer_dir
from tests.mp import REPO, base_env


def test_prepare_bench_reports_its_ratios(tmp_path_factory):
    tok = smollm2_tokenizer_dir(tmp_path_factory)
    work = tmp_path_factory.mktemp("bench_dir")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench", "prepare.py"), "--size", "0.6",
                           "--files-mb", "0.3", "--bare-mb", "0.2", "--skip-4x", "--pairs", "2", "--tokenizer", tok, "--dir", str(work)],
                          env=base_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["files"] == 2 and out["corpus_mb"] > 0.5
    w1, w2 = out["w1"], out["w2"]
    assert w1["tokens"] == w2["tokens"] > 0 and w1["documents"] == w2["documents"]  # same corpus, any workers
    bare, again = out["bare"], out["bare_after"]  # the bare encode brackets the tool's runs (host speed drifts)
    assert again["tokens"] == bare["tokens"] > 0 and out["bare_drift"] == again["tokens_per_s"] / bare["tokens_per_s"]
    w1_runs, w2_runs = out["w1_tokens_per_s_runs"], out["w2_tokens_per_s_runs"]
    assert len(w1_runs) == len(w2_runs) == 2 and w1_runs[0] == w1["tokens_per_s"] and w2_runs[0] == w2["tokens_per_s"]
    assert out["speedup_2w_pairs"] == [b / a for a, b in zip(w1_runs, w2_runs)]
    assert out["speedup_2w"] == pytest.approx(sum(out["speedup_2w_pairs"]) / 2, rel=1e-12)  # the median of two
    assert out["w1_over_bare"] == pytest.approx((sum(w1_runs) / 2) / ((bare["tokens_per_s"] + again["tokens_per_s"]) / 2), rel=1e-12)
    assert w1["peak_rss_mb"] > 50 and w2["peak_rss_mb"] > 50 and "rss_4x_over_1x" not in out  # --skip-4x
    # memory sampled from the tree: the 2-worker run is seen as the tool plus its two workers (at least), and the
    # sum of the processes' own high-water marks bounds the sampled peak from above
    assert w1["processes_seen"] >= 1 and w2["processes_seen"] >= 4  # + the shard writer
    assert w2["peak_hwm_sum_mb"] >= w2["peak_rss_mb"] * 0.99
    w1_tpc = out["w1_tokens_per_cpu_s_runs"]
    assert w1_tpc[0] == w1["tokens"] / (w1["main_cpu_s"] + w1["worker_cpu_s"])
    assert out["w1_over_bare_cpu"] == pytest.approx(
        (sum(w1_tpc) / 2) / ((bare["tokens_per_cpu_s"] + again["tokens_per_cpu_s"]) / 2), rel=1e-12)
    # CPU: the 1-worker run encodes in its own process, the 2-worker run in its pool
    assert w1["worker_cpu_s"] == 0 and w1["main_cpu_s"] > 0 and w2["worker_cpu_s"] > 0
    assert out["main_cpu_share_2w"] == w2["main_cpu_s"] / (w2["main_cpu_s"] + w2["worker_cpu_s"])
    assert 0 < out["main_cpu_share_2w"] < 1 and out["cpu_bound_speedup_2w"] > 0
    assert os.listdir(work) == []  # what it generated under --dir is gone
