"""tools/bench/startup.py: its synthetic shards are the real format, and a tiny run prints its JSON."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import webdataset

from mcd_scale.data.shards import ShardedDataset, write_shards
from tests.mp import REPO, base_env

TOOL = os.path.join(REPO, "tools", "bench", "startup.py")
_spec = importlib.util.spec_from_file_location("bench_startup", TOOL)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _tar_bytes(d: str) -> dict[str, bytes]:
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(d, "*.tar")))}


def test_synthetic_shards_are_what_write_shards_writes(tmp_path):
    """The templated writer (key digits and tar checksums patched per row) must give the bytes of
    write_shards for the same samples: otherwise the bench measures another format."""
    fields = bench._trajectory_fields(12, 50, 3)
    fast = bench.write_synthetic(str(tmp_path / "fast"), fields, 1234, 3, None)
    ref = write_shards(str(tmp_path / "ref"), ((g, fields) for g in range(1234)), samples_per_shard=412)
    assert _tar_bytes(str(tmp_path / "fast")) == _tar_bytes(str(tmp_path / "ref"))
    for a, b in zip(fast, ref):
        assert {k: a[k] for k in a if k != "sha256"} == {k: b[k] for k in b if k != "sha256"}
    # Sparse: only the wanted samples are real, the indexed reader gets them, the size is the full one.
    wanted = np.array([0, 411, 412, 1000, 1233])
    sparse = bench.write_synthetic(str(tmp_path / "sparse"), fields, 1234, 3, wanted)
    ds = ShardedDataset(str(tmp_path / "sparse"), manifest={"num_samples": 1234, "shards": sparse})
    for g in wanted:
        np.testing.assert_array_equal(ds[int(g)]["topk_ids"], fields["topk_ids"])
    assert [r["bytes"] for r in sparse] == [r["bytes"] for r in ref]
    got = list(webdataset.WebDataset(sorted(glob.glob(str(tmp_path / "fast" / "*.tar"))), shardshuffle=False))
    assert [s["__key__"] for s in got] == ["%010d" % g for g in range(1234)]


def test_tiny_run_prints_one_json(tmp_path):
    proc = subprocess.run([sys.executable, TOOL, "--samples", "600", "--shards", "3", "--seq-len", "16",
                           "--vocab", "100", "--global-batch", "8", "--micro-batch", "2", "--steps", "1",
                           "--ranks", "1", "--workers", "0", "--dir", str(tmp_path)],
                          env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["bench"] == "startup" and out["samples"] == 600 and out["shards"] == 3
    assert [(c["data"], c["ranks"], c["workers"]) for c in out["cases"]] == [("tokens", 1, 0), ("trajectories", 1, 0)]
    for c in out["cases"]:
        assert 0 < c["open_s"] <= c["startup_s"] <= c["steps_s"]
        assert c["rss_mb"] > 0 and c["peak_rss_mb"] > 0 and c["workers_seen"] == 0
    assert out["worst_startup_s"] == max(c["startup_s"] for c in out["cases"])
    assert out["resume_mid_shard"]["sample"] == 100 and out["resume_mid_shard"]["webdataset_s"] > 0
    assert isinstance(out["target_met"], bool) and out["token_index_bytes"] > 0
    assert os.listdir(tmp_path) == []  # its temporary data is gone

    bad = subprocess.run([sys.executable, TOOL, "--ranks", "one"], env=base_env(), capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--ranks" in bad.stderr and "Traceback" not in bad.stderr
