"""End to end on CPU: an MCD student (TP=2 + ZeRO-3 on 2 gloo ranks) distilled from a tiny teacher.

(a) ``deepspeed --num_gpus 2 mcd_scale/train.py`` with online MCD: exit 0, finite losses, the frozen
    teacher's weights untouched, the student's changed;
(b) ``tools/distill_rounds.py`` for 2 rounds of offline MCD (precompute + train per round): round 1's teacher is
    round 0's student, rounds.json and the summary are written. The suite runs the driver with its default
    launcher (one process per child, TP=1); the long tier (tools/dev/long_tests.py) with torchrun, 2 ranks at the
    config's TP=2 + ZeRO-3, which (a) and the SLURM pipeline test cover in the suite.
The teacher is a freshly initialised tiny model saved as model.safetensors (what a teacher run leaves).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import sys

import pytest
import torch

from tests.mp import REPO, free_port, run_cli, venv_bin

CFG = os.path.join(REPO, "configs", "tiny", "distill.yaml")
TINY = ["model.vocab_size=320", "model.seq_len=32", "model.hidden=32", "model.layers=2", "model.heads=2",
        "model.ffn_hidden=64", "parallel.micro_batch=4", "parallel.global_batch=4", "train.eval_every=3",
        "train.eval_batches=1", "train.log_every=1", "optimizer.lr=3e-3", "schedule.warmup_steps=0",
        "distill.steps_per_round=3", "distill.dt0=0.125", "checkpoint.every=0", "distill.top_k=16"]


def _sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(prepared data dir, teacher model.safetensors)."""
    from mcd_scale.config import load_config
    from mcd_scale.model.build import build_model
    from mcd_scale.model.weights import full_state_dict, save_safetensors
    from mcd_scale.rng import keyed_generator

    tmp = tmp_path_factory.mktemp("distill_e2e")
    words = ["the", "of", "and", "Emma", "Harriet", "said", "very", "well", "Mr.", "Knightley", "not", "she",
             "was", "would", "could", "be", "her", "his", "Miss", "Woodhouse", "Elton", "Jane", "Fairfax"]
    g = keyed_generator("distill-e2e-corpus", 0)
    idx = torch.randint(0, len(words), (300, 12), generator=g).tolist()
    text = "\n\n".join(" ".join(words[i] for i in row) + "." for row in idx) + "\n"
    src = tmp / "corpus.txt.gz"
    src.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    data = str(tmp / "prepared")
    proc = run_cli([sys.executable, os.path.join(REPO, "tools", "prepare_data.py"), str(src), "--out", data,
                    "--vocab-size", "320", "--seq-len", "32", "--samples-per-shard", "64", "--no-progress"],
                   timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    cfg = load_config([CFG], TINY)
    state = full_state_dict(build_model(cfg, None, init=True))
    teacher = str(tmp / "teacher" / "model.safetensors")
    save_safetensors(state, teacher)
    return data, teacher, tmp


def _train_losses(run_dir: str) -> list[float]:
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if x.strip()]
    return [r["loss"] for r in rows if r["split"] == "train"]


# fp32 is the long tier's: the fp32 TP=2 + ZeRO-3 step is checked for parity in tests/test_train_teacher.py and
# distilled online under ZeRO-3 by tests/test_convert_ckpt.py's student; bf16 (the 1B config's) runs here.
@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=pytest.mark.long), "bf16"])
def test_online_mcd_tp2_zero3_deepspeed(setup, precision):
    """bf16 is the 1B distillation config's precision: the student trains in bf16 under ZeRO-3 while the
    frozen teacher (an fp32 file) is read, never written."""
    from safetensors.torch import load_file

    data, teacher, tmp = setup
    run_dir = str(tmp / f"online_{precision}")
    before = _sha(teacher)
    sets = TINY + [f"data.path={data}", "train.objective=mcd", "distill.teacher_mode=online",
                   f"distill.teacher={teacher}", f"run.dir={run_dir}", "train.steps=4", "distill.round=1",
                   f"train.precision={precision}"]
    cmd = [venv_bin("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "mcd_scale", "train.py"), "--config", CFG]
    for s in sets:
        cmd += ["--set", s]
    proc = run_cli(cmd, timeout=240)
    assert proc.returncode == 0, proc.stdout[-6000:]
    losses = _train_losses(run_dir)
    assert len(losses) == 4 and all(math.isfinite(v) and v > 0 for v in losses), losses
    assert _sha(teacher) == before  # the frozen teacher is outside the optimizer
    student = load_file(os.path.join(run_dir, "checkpoints", open(os.path.join(run_dir, "checkpoints",
                                                                                "latest")).read().strip(),
                                     "model.safetensors"))
    ref = load_file(teacher)
    assert set(student) == set(ref)
    assert {v.dtype for v in student.values()} == {torch.bfloat16 if precision == "bf16" else torch.float32}
    changed = [k for k in ref if not torch.equal(student[k].float(), ref[k].float())]
    assert len(changed) >= len(ref) // 2, (len(changed), len(ref))
    print(f"\n[online mcd tp2+zero3 {precision}] losses {['%.4f' % v for v in losses]}")


@pytest.mark.parametrize("launcher", ["python", pytest.param("torchrun", marks=pytest.mark.long)])
def test_driver_two_offline_rounds(setup, launcher):
    from safetensors.torch import load_file

    data, teacher, tmp = setup
    run_dir = str(tmp / f"rounds_{launcher}")
    cmd = [sys.executable, os.path.join(REPO, "tools", "distill_rounds.py"), "--teacher", teacher, "--config", CFG,
           "--run-dir", run_dir, "--rounds", "2", "--mode", "offline", "--limit", "16"]
    if launcher == "torchrun":  # 2 ranks at the config's TP=2 + ZeRO-3
        cmd += ["--launcher", f"{venv_bin('torchrun')} --standalone --nproc_per_node 2"]
        layout = []
    else:  # the driver's default launcher: one process per child
        layout = ["parallel.tp=1", "parallel.zero_stage=0"]
    for s in TINY + layout + [f"data.path={data}"]:
        cmd += ["--set", s]
    proc = run_cli(cmd, timeout=560)  # 4 child launches; generous for a loaded CI box
    assert proc.returncode == 0, proc.stdout[-8000:]
    assert "[distill_rounds] summary" in proc.stdout
    rec = json.load(open(os.path.join(run_dir, "rounds.json")))
    r0, r1 = rec["rounds"]
    assert r0["teacher"] == os.path.abspath(teacher) and r1["teacher"] == r0["student"]
    # tolerance: dt doubles exactly in float64 (powers of two): approx default is ample
    assert r1["dt"] == pytest.approx(2 * r0["dt"]) and r1["temperature"] < r0["temperature"]
    for r in (r0, r1):
        assert math.isfinite(r["loss"]) and r["loss"] > 0 and math.isfinite(r["val_nelbo"])
        assert os.path.isfile(os.path.join(r["run_dir"], "trajectories", "manifest.json"))
    # round 1's trajectories were computed by round 0's student (the manifest records the teacher's sha256)
    m1 = json.load(open(os.path.join(r1["run_dir"], "trajectories", "manifest.json")))
    assert m1["teacher"]["sha256"] == _sha(r0["student"]) != _sha(teacher) and m1["round"] == 1
    s0, t0 = load_file(r0["student"]), load_file(teacher)
    assert any(not torch.equal(s0[k], t0[k]) for k in t0)
    print(f"\n[driver offline] " + " | ".join(f"round {r['round']}: loss {r['loss']:.4f} val {r['val_nelbo']:.4f} "
                                              f"{r['seconds']:.1f}s" for r in rec["rounds"]))


def test_driver_propagates_child_exit_code(setup):
    data, teacher, tmp = setup
    cmd = [sys.executable, os.path.join(REPO, "tools", "distill_rounds.py"), "--teacher", teacher, "--config", CFG,
           "--run-dir", str(tmp / "bad"), "--rounds", "1", "--mode", "online", "--launcher", "python"]
    for s in TINY + [f"data.path={data}", "parallel.tp=3"]:  # heads=2 not divisible by tp=3: config error
        cmd += ["--set", s]
    proc = run_cli(cmd, timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "failed with exit code 2" in proc.stdout and "parallel.tp" in proc.stdout
