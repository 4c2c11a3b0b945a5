"""precompute_trajectories --limit default (what the round reads) and --dry-run (the round's trajectory
bytes against the free space of --out's file system), and the disk plan's trajectory estimate against the
bytes a real precompute writes."""
from __future__ import annotations

import json
import os
import subprocess

from mcd_scale.config import load_config
from mcd_scale.data.manifest import load_manifest
from mcd_scale.distill.disk_plan import round_samples, trajectory_round_bytes
from tests.mp import REPO, base_env
from tests.test_trajectories import make_teacher, make_tokens, tool_cmd

ROUND = ["--set", "distill.steps_per_round=3", "--set", "parallel.global_batch=4", "--set", "parallel.micro_batch=2"]


def _run(cmd, env=None):
    return subprocess.run(cmd, cwd=REPO, env=base_env(env), capture_output=True, text=True, timeout=180)


def test_default_limit_is_the_round_and_the_estimate_matches_the_written_bytes(tmp_path):
    teacher = make_teacher(str(tmp_path / "teacher"))
    data = make_tokens(str(tmp_path / "tokens"))  # 22 train samples
    out = str(tmp_path / "traj")
    dry = _run(tool_cmd(teacher, data, out, *ROUND, "--dry-run"))
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["samples"] == plan["round_reads"] == 12 and plan["train_split"] == 22 and plan["fits"], plan
    assert not os.path.exists(out), "--dry-run wrote something"

    res = _run(tool_cmd(teacher, data, out, *ROUND))
    assert res.returncode == 0, res.stderr
    manifest = load_manifest(out)
    assert manifest["splits"]["train"]["num_samples"] == 12  # 3 steps x global batch 4, not the 22 of the split
    written = sum(os.path.getsize(os.path.join(out, "train", f)) for f in os.listdir(os.path.join(out, "train")))
    cfg = load_config([os.path.join(teacher, "config.resolved.yaml")],
                      ["distill.steps_per_round=3", "parallel.global_batch=4", "parallel.micro_batch=2"])
    assert round_samples(cfg) == 12
    estimate = trajectory_round_bytes(cfg, 12, 6)
    assert plan["bytes_per_round"] == estimate
    assert abs(estimate - written) <= 0.15 * written, (estimate, written)


def test_dry_run_refuses_a_round_the_file_system_cannot_hold(tmp_path):
    teacher = make_teacher(str(tmp_path / "teacher"))
    data = make_tokens(str(tmp_path / "tokens"))
    out = str(tmp_path / "traj")
    res = _run(tool_cmd(teacher, data, out, *ROUND, "--limit", "all", "--dry-run"), env={"MCD_FAULT_FREE_BYTES": "1000"})
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "precompute_trajectories: error" in ln]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "--out" in lines[0] and "1000 B free" in lines[0] and "22 samples" in lines[0], lines  # --limit all: the split
    assert not os.path.exists(out)
    bad = _run(tool_cmd(teacher, data, out, "--limit", "many", "--dry-run"))
    assert bad.returncode == 2 and "--limit" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
