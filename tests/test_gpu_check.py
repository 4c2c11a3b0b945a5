"""tools/gpu_check.py --device cpu --tiny: the GPU acceptance check's code paths run in CI (no timing assertion)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.mp import REPO

ROWS = {"teacher_tp_zero3", "teacher_3d", "precompute", "mcd_online", "mcd_offline", "sdtt", "sampling",
        "bf16_vs_fp32", "step_time"}


def test_gpu_check_cpu_tiny_prints_one_json_with_every_row_ok(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--out", str(tmp_path / "report.json")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)  # stdout is the JSON and nothing else
    assert json.loads((tmp_path / "report.json").read_text()) == report
    rows = {r["check"]: r for r in report["rows"]}
    assert set(rows) == ROWS and len(report["rows"]) == len(ROWS)
    bad = {name: r for name, r in rows.items() if r["ok"] is not True}
    assert not bad and report["ok"] is True, bad
    assert (report["device"], report["world_size"]) == ("cpu", 1)
    for name in ("teacher_tp_zero3", "teacher_3d", "mcd_online", "mcd_offline", "sdtt"):
        assert rows[name]["exit_code"] == 0 and len(rows[name]["losses"]) == 3, (name, rows[name])
    assert rows["teacher_tp_zero3"]["zero_stage"] == 3 and rows["teacher_3d"]["zero_stage"] == 1
    assert rows["precompute"]["samples"] == 32 and rows["precompute"]["shard_bytes_per_sample"] > 0
    assert rows["sampling"]["device"] == "cpu" and rows["sampling"]["nfe"] > 0
    assert rows["bf16_vs_fp32"]["rel_diff"] < rows["bf16_vs_fp32"]["tolerance"]
    timing = rows["step_time"]["rows"]
    assert {(r["micro_batch"], r["activation_checkpointing"]) for r in timing} == {(2, False), (2, True)}
    for r in timing:
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["plan_total_bytes"] > 0, r


def test_gpu_check_bad_flags_exit_2():
    for argv in (["--device", "tpu"], ["--nproc", "0", "--device", "cpu"]):
        proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_check.py"), *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (argv, proc.stderr)
