"""tools/gpu_check.py --device cpu --tiny: the GPU acceptance check's code paths run in CI (no timing assertion)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.mp import REPO

ROWS = {"teacher_tp_zero3", "teacher_3d", "precompute", "mcd_online", "mcd_offline", "sdtt", "sampling",
        "bf16_vs_fp32", "step_time"}


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]  # every stdout line is one JSON row


def test_gpu_check_cpu_tiny_streams_one_json_line_per_row_every_row_ok(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "report.jsonl"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    lines = _lines(proc.stdout)
    assert _lines(out.read_text()) == lines
    summary = lines[-1]
    assert summary["summary"] is True and summary["ok"] is True and summary["failed"] == []
    assert (summary["device"], summary["world_size"]) == ("cpu", 1)
    rows = {r["check"]: r for r in lines[:-1]}
    assert set(rows) == ROWS | {"step_time/step_mb2_nockpt", "step_time/step_mb2_ckpt"}
    bad = {name: r for name, r in rows.items() if r["ok"] is not True}
    assert not bad, bad
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


def test_a_failing_row_does_not_lose_the_others_and_rows_filters():
    """mcd_offline without the precompute row has no trajectory shards: it fails alone, the rows around it report."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--rows", "teacher_tp_zero3", "mcd_offline", "bf16_vs_fp32"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    lines = _lines(proc.stdout)
    assert [r.get("check") for r in lines[:-1]] == ["teacher_tp_zero3", "mcd_offline", "bf16_vs_fp32"]
    assert [r["ok"] for r in lines[:-1]] == [True, False, True]
    assert lines[-1]["failed"] == ["mcd_offline"] and lines[-1]["ok"] is False


def test_under_timeout_the_check_ends_and_keeps_the_rows_it_finished():
    """timeout -k as tools/gpu_check.sh runs it: a SIGTERM that reaches the check part-way (here sent to `timeout`,
    which passes it on and then starts its -k kill timer, exactly as when its own limit expires) ends the run
    within the kill window, and the rows printed before it stay whole JSON. The signal is sent once the first row
    is out, so the test does not depend on how fast this machine runs a row."""
    import signal
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(["timeout", "-k", "10", "600", sys.executable, os.path.join(REPO, "tools", "gpu_check.py"),
                             "--device", "cpu", "--tiny"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        first = proc.stdout.readline()  # the first finished row
        assert first.strip(), "the check printed nothing before ending"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, "the check ran to its end: the signal was lost"
    assert elapsed < 10 + 15, elapsed  # within the -k window (plus start-up slack)
    lines = _lines(first + rest)  # every line that made it out is whole JSON
    assert lines and all("check" in r or r.get("summary") for r in lines), first + rest
    assert not any(r.get("summary") and r.get("ok") for r in lines), "a stopped check must not report success"


def test_gpu_check_bad_flags_exit_2():
    for argv in (["--device", "tpu"], ["--nproc", "0", "--device", "cpu"]):
        proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_check.py"), *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (argv, proc.stderr)
