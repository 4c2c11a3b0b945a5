"""The 1B recipe on CPU, shrunk: configs/teacher_1b.yaml and configs/distill_1b.yaml run as shipped except
the overrides listed below, on gloo ranks: bf16 + ZeRO-3 + TP=2 (+ activation checkpointing) through full
engine steps, checkpoints, kill -9 and a bit-exact resume; the distillation config online and offline.

Every override, and why it is unavoidable on a 2-core CPU box:
* SHRINK: model width/depth/vocab/sequence (the 1.2B model does not fit a CPU test);
* BATCH: parallel.micro_batch / global_batch (512 sequences per step would be 32 micro-batches per rank);
* RUN: run.dir, data.path, train.steps, checkpoint.every, train.eval_every=0, train.log_every=1 (per-step
  losses to compare), data.num_workers=0 (no reader processes on a 2-core box);
* ACT_CKPT: parallel.activation_checkpointing=true in the teacher run: the 1B configs decide it off for
  GPUs (docs/performance.md "Memory plan"), and the combination must still run for larger micro-batches;
* distill: distill.teacher (the shrunk teacher run), distill.teacher_mode for the online variant,
  data.trajectories for the offline one, distill.top_k=16 (k <= the shrunk vocabulary).
Tied embeddings: the distillation runs use model.tie_embeddings=true, for teacher and student alike.
"""
from __future__ import annotations

import json
import math
import os
import sys
import types

import pytest

from tests.mp import REPO, run_cli

TEACHER = os.path.join(REPO, "configs", "teacher_1b.yaml")
DISTILL = os.path.join(REPO, "configs", "distill_1b.yaml")
SHRINK = ["model.vocab_size=512", "model.seq_len=32", "model.hidden=32", "model.layers=2", "model.heads=2",
          "model.ffn_hidden=64"]
BATCH = ["parallel.micro_batch=2", "parallel.global_batch=4"]
RUN = ["train.eval_every=0", "train.log_every=1", "data.num_workers=0"]
ACT_CKPT = ["parallel.activation_checkpointing=true"]


def _launch(config, nproc, sets, env=None, timeout=300):
    from tests.mp import run_cli_ranks

    argv = ["-m", "mcd_scale.train", "--config", config]
    for s in sets:
        argv += ["--set", s]
    codes, logs = run_cli_ranks(argv, nproc, timeout=timeout, env=env)
    return types.SimpleNamespace(returncode=max(codes, key=abs), codes=codes, stdout=logs)


def _train_losses(run_dir) -> dict[int, float]:
    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8"):
        row = json.loads(line)
        if row.get("split") == "train":
            out[row["step"]] = row["loss"]
    return out


@pytest.fixture(scope="module")
def data(tiny_base) -> str:
    return tiny_base[0]  # the session's prepared corpus (vocab 512, seq 32; read-only)


def _teacher_sets(run_dir, data, tie=False):
    return SHRINK + BATCH + RUN + ACT_CKPT + [f"model.tie_embeddings={str(tie).lower()}", f"run.dir={run_dir}",
                                               f"data.path={data}", "train.steps=2", "checkpoint.every=1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data) -> str:
    """The shrunk teacher_1b run (4 ranks: TP=2 x DP=2, tied embeddings), uninterrupted; shared by the tests."""
    run_dir = str(tmp_path_factory.mktemp("recipe") / "teacher")
    res = _launch(TEACHER, 4, _teacher_sets(run_dir, data, tie=True))
    assert res.returncode == 0, res.stdout[-6000:]
    return run_dir


def test_teacher_1b_shrunk_resumes_bit_exact_from_its_step_1_checkpoint(teacher, data, tmp_path):
    """The shrunk recipe's state (bf16, ZeRO-3, TP=2 x DP=2, tied embeddings, activation checkpointing) resumes
    bit for bit: a run directory holding only the uninterrupted run's step-1 checkpoint (what a run killed after
    step 1 leaves, the long tier's kill variant below) trains step 2 to the uninterrupted loss. Killing every
    rank and resuming is tests/test_train_teacher.py::test_resume_after_kill_is_exact's (ZeRO-1 and ZeRO-3)."""
    import shutil

    full = _train_losses(teacher)
    assert sorted(full) == [1, 2] and all(math.isfinite(v) for v in full.values()), full
    cut = str(tmp_path / "cut")
    shutil.copytree(os.path.join(teacher, "checkpoints", "step_000001"),
                    os.path.join(cut, "checkpoints", "step_000001"))
    with open(os.path.join(cut, "checkpoints", "latest"), "w", encoding="utf-8") as fh:
        fh.write("step_000001")
    resumed = _launch(TEACHER, 4, _teacher_sets(cut, data, tie=True))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-6000:]
    again = _train_losses(cut)
    assert sorted(again) == [2], again  # only step 2 ran, after the resume
    assert again[2] == full[2], f"step 2: uninterrupted {full[2]!r} vs resumed {again[2]!r}"


@pytest.mark.long  # the suite resumes the uninterrupted run's step-1 checkpoint (the test above); killing every
# rank and resuming is tests/test_train_teacher.py::test_resume_after_kill_is_exact's
def test_teacher_1b_shrunk_resumes_bit_exact_after_kill(teacher, data, tmp_path):
    full = _train_losses(teacher)
    assert sorted(full) == [1, 2] and all(math.isfinite(v) for v in full.values()), full
    cut = str(tmp_path / "cut")
    sets = _teacher_sets(cut, data, tie=True)
    killed = _launch(TEACHER, 4, sets, env={"MCD_FAULT_EXIT_AT_STEP": "1"})  # every rank dies (SIGKILL-like)
    assert killed.returncode != 0, "the injected kill did not happen"
    resumed = _launch(TEACHER, 4, sets)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-6000:]
    again = _train_losses(cut)
    for s in (1, 2):  # step 2 ran after the resume from step 1's checkpoint
        assert again[s] == full[s], f"step {s}: uninterrupted {full[s]!r} vs resumed {again[s]!r}"


def _distill_sets(run_dir, data, teacher_dir):
    return SHRINK + BATCH + RUN + ["model.tie_embeddings=true", f"run.dir={run_dir}", f"data.path={data}",
                                   "train.steps=2", "checkpoint.every=2", f"distill.teacher={teacher_dir}",
                                   "distill.top_k=16"]


def test_distill_1b_shrunk_online(teacher, data, tmp_path):
    run_dir = str(tmp_path / "online")
    res = _launch(DISTILL, 2, _distill_sets(run_dir, data, teacher) + ["distill.teacher_mode=online"])
    assert res.returncode == 0, res.stdout[-6000:]
    got = _train_losses(run_dir)
    assert sorted(got) == [1, 2] and all(math.isfinite(v) and v >= 0 for v in got.values()), got


def test_distill_1b_shrunk_offline(teacher, data, tmp_path):
    traj = str(tmp_path / "traj")
    sets = _distill_sets(str(tmp_path / "offline"), data, teacher)
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "tools", "precompute_trajectories.py"), "--teacher", teacher, "--data", data,
           "--out", traj, "--config", DISTILL, "--limit", "16", "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    pre = run_cli(cmd, timeout=300)
    assert pre.returncode == 0, pre.stdout[-6000:]
    res = _launch(DISTILL, 2, sets + [f"data.trajectories={traj}"])
    assert res.returncode == 0, res.stdout[-6000:]
    got = _train_losses(str(tmp_path / "offline"))
    assert sorted(got) == [1, 2] and all(math.isfinite(v) and v >= 0 for v in got.values()), got
