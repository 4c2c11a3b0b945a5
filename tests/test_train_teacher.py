"""Teacher pretraining end to end on CPU/gloo: layout parity, exact resume, failure policies.

Every run is a real multi-process launch of ``mcd_scale.train`` (torchrun) on a tiny model and tiny
shards prepared from the embedded corpus. Parity compares per-step losses from ``metrics.jsonl``
(logged every step) between layouts that start from the same layout-independent weights and see
the same global batches.
"""
from __future__ import annotations

import gzip
import json
import os
import sys

import pytest
import torch

from tests.mp import REPO, run_cli, run_cli_ranks

TINY = [
    "model.vocab_size=512", "model.seq_len=32", "model.hidden=32", "model.layers=2", "model.heads=2",
    "model.ffn_hidden=64", "parallel.micro_batch=2", "parallel.global_batch=8", "train.log_every=1",
    "train.eval_every=0", "optimizer.lr=3e-3", "schedule.warmup_steps=2", "train.seed=7",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("tiny_data")
    with gzip.open(os.path.join(REPO, "data", "austen.txt.gz"), "rt", encoding="utf-8") as fh:
        text = fh.read(150_000)
    src = tmp / "corpus.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp / "prepared"
    res = run_cli([sys.executable, "tools/prepare_data.py", str(src), "--out", str(out), "--vocab-size", "512",
                   "--seq-len", "32", "--no-progress"], timeout=300)
    assert res.returncode == 0, res.stdout
    return str(out)


# One uninterrupted ZeRO-1 DP=2 run of 6 steps, shared (read-only) by the tests that need that reference: the exact
# resume at ZeRO-1, the kill inside a save and the universal checkpoint. Saving never changes the numerics, so its
# losses are the reference of runs that checkpoint at another cadence too (a save that consumed a random draw or
# touched the optimizer would now show up as a mismatch).
ZERO1_REF = ["train.steps=6", "parallel.zero_stage=1", "checkpoint.every=3", "checkpoint.universal=true",
             "checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def zero1_ref(prepared, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("zero1_ref") / "ref"
    res = train(run_dir, prepared, 2, ZERO1_REF)
    assert res.returncode == 0, res.stdout[-4000:]
    return run_dir


def train(run_dir, prepared, nproc, overrides, env=None, timeout=420):
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mcd_scale.train", "--config", "configs/tiny/teacher.yaml",
           "--set", f"data.path={prepared}", "--set", f"run.dir={run_dir}"]
    for o in TINY + list(overrides):
        cmd += ["--set", o]
    return run_cli(cmd, timeout=timeout, env=env)


def train_ranks(run_dir, prepared, nproc, overrides, env=None, timeout=420):
    """Like train() but without an agent, so each rank's exit code is visible (torchrun maps them to 1)."""
    argv = ["-m", "mcd_scale.train", "--config", "configs/tiny/teacher.yaml",
            "--set", f"data.path={prepared}", "--set", f"run.dir={run_dir}"]
    for o in TINY + list(overrides):
        argv += ["--set", o]
    return run_cli_ranks(argv, nproc, timeout=timeout, env=env)


def losses(run_dir) -> dict[int, float]:
    """step -> loss of the LAST record of that step (a resumed run re-logs steps after its checkpoint)."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row.get("split") == "train":
                out[row["step"]] = row["loss"]
    return out


def assert_close(a: dict, b: dict, steps, rtol, what, scale: float = 0.0):
    """Losses of ``a`` equal ``b``'s at ``steps`` within ``rtol`` of ``max(|b[s]|, scale)``. ``scale`` (the run's
    loss scale) is for losses that fall near 0 on some steps (a distillation KL a few steps in): there a relative
    tolerance on the value itself asks for agreement below float32 rounding of the terms it is summed from."""
    for s in steps:
        assert s in a and s in b, f"{what}: step {s} missing ({sorted(a)}, {sorted(b)})"
        tol = rtol * max(abs(b[s]), scale)
        assert abs(a[s] - b[s]) <= tol, f"{what}: step {s}: {a[s]} vs {b[s]} (tolerance {tol:.3g})"


@pytest.fixture(scope="module")
def dp2_zero0_ref(prepared, tmp_path_factory):
    """The layout-parity reference: TP=1 x PP=1, DP=2, ZeRO-0, fp32, 3 steps (read-only, shared)."""
    run_dir = tmp_path_factory.mktemp("dp2_zero0_ref") / "z0"
    res = train(run_dir, prepared, 2, ["train.steps=3", "parallel.zero_stage=0", "checkpoint.every=0"])
    assert res.returncode == 0, res.stdout[-4000:]
    return run_dir


def test_pp2_matches_pp1_and_dp_size(prepared, dp2_zero0_ref, tmp_path):
    """PP=2 (2 stages, ZeRO-1) and TP=2 x PP=2 (4 ranks) vs PP=1 (DP=2, ZeRO-0): the same losses over 3
    steps (fp32, rtol 1e-5)."""
    b = train(tmp_path / "pp2", prepared, 2, ["train.steps=3", "parallel.pp=2", "parallel.zero_stage=1",
                                              "checkpoint.every=0"])
    assert b.returncode == 0, b.stdout[-4000:]
    la, lb = losses(dp2_zero0_ref), losses(tmp_path / "pp2")
    # tolerance (every layout comparison here): float32 training, the layout changes summation order (TP-split matmul
    # reductions, all-reduce order): ~1e-6 relative in the loss per step; Adam's first updates are ~sign(g), with
    # |g| < eps=1e-8 damped, so 3 steps do not amplify it past ~1e-6; rtol 1e-5 is an estimate with ~10x margin
    assert_close(lb, la, [1, 2, 3], 1e-5, "PP=2 vs PP=1")
    # The full first menu on 4 ranks: TP=2 x PP=2 (DP=1, ZeRO-1) through the pipeline engine.
    c = train(tmp_path / "tp2pp2", prepared, 4, ["train.steps=3", "parallel.tp=2", "parallel.pp=2",
                                                 "parallel.zero_stage=1", "checkpoint.every=0"])
    assert c.returncode == 0, c.stdout[-4000:]
    assert_close(losses(tmp_path / "tp2pp2"), la, [1, 2, 3], 1e-5, "TP=2 x PP=2 vs PP=1")


def test_zero3_tp2_dp2_matches_zero0(prepared, dp2_zero0_ref, tmp_path):
    """ZeRO-3 with TP=2 x DP=2 on 4 ranks vs ZeRO-0 with TP=1 x DP=2: same losses over 3 steps (fp32, rtol 1e-5)."""
    z3 = train(tmp_path / "z3", prepared, 4, ["train.steps=3", "parallel.tp=2", "parallel.zero_stage=3",
                                              "checkpoint.every=0"])
    assert z3.returncode == 0, z3.stdout[-4000:]
    assert_close(losses(tmp_path / "z3"), losses(dp2_zero0_ref), [1, 2, 3], 1e-5, "ZeRO-3 TP2 vs ZeRO-0")
    ckpt = tmp_path / "z3" / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    assert (ckpt / tag / "model.safetensors").exists() and (ckpt / tag / "config.resolved.yaml").exists()
    assert (tmp_path / "z3" / "config.resolved.yaml").exists()
    # The consolidated weights of a TP=2 ZeRO-3 run load strictly into a single-process TP=1 model.
    exported = tmp_path / "export"
    res = run_cli([sys.executable, "tools/convert_ckpt.py", "export", str(tmp_path / "z3"), "--out", str(exported)])
    assert res.returncode == 0, res.stdout
    info = run_cli([sys.executable, "tools/convert_ckpt.py", "inspect", str(tmp_path / "z3"), "--json"])
    layout = json.loads(info.stdout)["layout"]
    assert (layout["tp"], layout["dp"], layout["zero_stage"]) == (2, 2, 3), info.stdout
    from mcd_scale.config import load_config
    from mcd_scale.model.build import build_model
    from mcd_scale.model.flops import count_parameters
    from mcd_scale.model.weights import load_full_state_dict, load_safetensors

    cfg = load_config([str(exported / "config.yaml")], ["parallel.tp=1", "parallel.zero_stage=0"])
    model = build_model(cfg, None, init=False)
    state = load_safetensors(str(exported / "model.safetensors"))
    load_full_state_dict(model, state, None)
    assert sum(v.numel() for v in state.values()) == count_parameters(cfg.model)


def test_bf16_zero3_tp2_tracks_fp32(prepared, tmp_path):
    """The 1B configs' precision and layout (bf16, ZeRO-3, TP=2 x DP=2, 4 ranks) on CPU: losses within bf16
    rounding of fp32 ZeRO-0 (and not equal to them: bf16 really ran), and the bf16 optimizer states are saved.
    The bit-exact resume of this combination (with activation checkpointing on top) is
    tests/test_recipe_1b.py::test_teacher_1b_shrunk_resumes_bit_exact_from_its_step_1_checkpoint (the kill -9
    variant is the long tier's test_teacher_1b_shrunk_resumes_bit_exact_after_kill)."""
    ref = train(tmp_path / "fp32", prepared, 2, ["train.steps=4", "parallel.zero_stage=0", "checkpoint.every=0"])
    assert ref.returncode == 0, ref.stdout[-4000:]
    bf16 = ["train.steps=4", "parallel.zero_stage=3", "parallel.tp=2", "train.precision=bf16", "checkpoint.every=4"]
    full = train(tmp_path / "bf16", prepared, 4, bf16)
    assert full.returncode == 0, full.stdout[-4000:]
    lf, l32 = losses(tmp_path / "bf16"), losses(tmp_path / "fp32")
    # tolerance: bf16 forward (u = 2^-8) with fp32 master weights: per-token CE errors ~u*|logit| of random sign average
    # over the batch's tokens to ~1e-4 relative; 1e-3 (and the inequality below proves bf16 ran)
    assert_close(lf, l32, [1, 2, 3, 4], 1e-3, "bf16 ZeRO-3 TP2 vs fp32 ZeRO-0")
    assert any(lf[s] != l32[s] for s in lf), "bf16 losses equal fp32 bit for bit: bf16 did not run"
    assert list((tmp_path / "bf16" / "checkpoints" / "step_000004").glob("bf16_zero_*optim_states.pt"))


@pytest.mark.parametrize("zero", [1, 3])
def test_resume_after_kill_is_exact(prepared, tmp_path, zero, request):
    """'train 6' == 'train 3, kill -9 at step 4, resume, train to 6' (bit-for-bit losses)."""
    common = ["train.steps=6", f"parallel.zero_stage={zero}", "checkpoint.every=3"]
    if zero == 1:
        full_dir = request.getfixturevalue("zero1_ref")
    else:
        full_dir = tmp_path / "full"
        full = train(full_dir, prepared, 2, common)
        assert full.returncode == 0, full.stdout[-4000:]
    killed = train(tmp_path / "cut", prepared, 2, common, env={"MCD_FAULT_EXIT_AT_STEP": "4"})
    assert killed.returncode != 0, "the injected kill did not happen"
    ckpt = tmp_path / "cut" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_000003"
    resumed = train(tmp_path / "cut", prepared, 2, common)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "resumed from" in resumed.stdout
    lf, lr = losses(full_dir), losses(tmp_path / "cut")
    for s in range(1, 7):
        assert lf[s] == lr[s], f"ZeRO-{zero} step {s}: uninterrupted {lf[s]!r} vs resumed {lr[s]!r}"


def test_kill_inside_a_checkpoint_save_leaves_the_previous_one_and_resumes_exactly(prepared, zero1_ref, tmp_path):
    """kill -9 on every rank while the step-4 checkpoint is staged (files written, not yet COMPLETE or
    renamed): 'latest' still names step 2, the partial copy is never listed or loaded, the next save
    clears it, and the resumed run's losses equal the uninterrupted run's bit for bit."""
    common = ["train.steps=6", "parallel.zero_stage=1", "checkpoint.every=2"]  # reference: zero1_ref (saves every 3)
    codes, out = train_ranks(tmp_path / "cut", prepared, 2, common, env={"MCD_FAULT_EXIT_IN_SAVE": "4"})
    assert codes == [9, 9], out[-4000:]
    ckpt = tmp_path / "cut" / "checkpoints"
    staged = ckpt / ".staging" / "step_000004"
    assert (staged / "model.safetensors").exists() and not (staged / "COMPLETE").exists()  # died mid-save
    assert (ckpt / "latest").read_text().strip() == "step_000002" and not (ckpt / "step_000004").exists()
    from mcd_scale.export import convert as convert_ckpt
    assert convert_ckpt.inspect(str(tmp_path / "cut"))["tags"] == ["step_000002"]
    resumed = train(tmp_path / "cut", prepared, 2, common)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "resumed from" in resumed.stdout and "step_000002" in resumed.stdout
    assert not staged.exists() and not [p for p in (ckpt / ".staging").iterdir() if p.is_dir()]
    assert (ckpt / "latest").read_text().strip() == "step_000006"
    lf, lr = losses(zero1_ref), losses(tmp_path / "cut")
    for s in range(1, 7):
        assert lf[s] == lr[s], f"step {s}: uninterrupted {lf[s]!r} vs resumed {lr[s]!r}"


def _checkpoint_copy(src_run, tag, dst_run, drop=()):
    """A new run directory holding only ``tag`` of ``src_run``; ``drop`` names files the copied tag
    behaves as if never written (gone from disk and from its integrity record, as a run with that
    option off would have saved it)."""
    import shutil

    dst = dst_run / "checkpoints"
    shutil.copytree(src_run / "checkpoints" / tag, dst / tag, ignore=shutil.ignore_patterns(*drop))
    if drop:
        marker = dst / tag / "COMPLETE"
        record = json.loads(marker.read_text())
        record["files"] = {k: v for k, v in record["files"].items() if os.path.basename(k) not in drop}
        marker.write_text(json.dumps(record))
    (dst / "latest").write_text(tag)
    return dst_run


# The universal resume runs: ZERO1_REF's settings less its ZeRO stage, each resume adding its own layout.
UNIVERSAL_RESUME = ["train.steps=6", "checkpoint.every=3", "checkpoint.universal=true", "checkpoint.keep_last=0"]


def _universal_resume_continues(zero1_ref, prepared, tmp_path, name, nproc, layout):
    """Resume a copy of the shared ZeRO-1 reference's step-3 checkpoint at ``layout`` through
    universal.safetensors; steps 4-6 must continue the uninterrupted run's losses (rtol 1e-5)."""
    run = _checkpoint_copy(zero1_ref, "step_000003", tmp_path / name)
    res = train(run, prepared, nproc, UNIVERSAL_RESUME + layout)
    assert res.returncode == 0, res.stdout[-4000:]
    assert "universal resume from" in res.stdout and "resumed from" in res.stdout
    assert_close(losses(run), losses(zero1_ref), [4, 5, 6], 1e-5, f"universal resume at {name} vs uninterrupted ZeRO-1")


@pytest.mark.long  # the suite resumes a universal file equal to the live one at TP=2 x PP=2:
# tests/test_convert_ckpt.py::test_reshard_teacher_from_shards_samples_and_resumes_at_tp2_pp2
def test_universal_checkpoint_resumes_at_pp2(prepared, zero1_ref, tmp_path):
    """The ZeRO-1 DP=2 run's step-3 universal checkpoint resumes at PP=2 (ZeRO-1) and continues its losses."""
    _universal_resume_continues(zero1_ref, prepared, tmp_path, "pp2", 2, ["parallel.zero_stage=1", "parallel.pp=2"])


def test_universal_checkpoint_resumes_at_another_layout(prepared, zero1_ref, tmp_path):
    """checkpoint.universal: a ZeRO-1 DP=2 run's step-3 checkpoint resumes at ZeRO-3 TP=2 and at ZeRO-0 on one
    rank, and each continues with the uninterrupted run's losses (rtol 1e-5, the layout-parity tolerance; with the
    moments left at zero step 5 is off by ~2e-2). Without universal.safetensors another layout is refused on every
    rank with exit 2 naming the fix. (The resume at PP=2 is the long tier's
    test_universal_checkpoint_resumes_at_pp2; in the suite a universal file equal to the live one resumes at
    TP=2 x PP=2 in tests/test_convert_ckpt.py::test_reshard_teacher_from_shards_samples_and_resumes_at_tp2_pp2.)"""
    from safetensors.torch import load_file

    common = UNIVERSAL_RESUME
    assert set(common + ["parallel.zero_stage=1"]) == set(ZERO1_REF)  # the shared reference is this run
    ckpt = zero1_ref / "checkpoints" / "step_000003"
    uni, weights = load_file(ckpt / "universal.safetensors"), load_file(ckpt / "model.safetensors")
    assert int(uni["meta/adam_step"]) == 3 and int(uni["meta/lr_epoch"]) == 3
    for name, w in weights.items():  # fp32 run: the master is the weight; both moments are live
        assert torch.equal(uni[f"fp32/{name}"], w), name
        assert uni[f"exp_avg/{name}"].shape == w.shape and uni[f"exp_avg_sq/{name}"].abs().sum() > 0, name
    assert len(uni) == 3 * len(weights) + 2
    from mcd_scale.export import convert as convert_ckpt
    assert convert_ckpt.inspect(str(zero1_ref))["universal"] is True
    for name, nproc, layout in (("z3tp2", 2, ["parallel.zero_stage=3", "parallel.tp=2"]),
                                ("z0", 1, ["parallel.zero_stage=0"])):
        _universal_resume_continues(zero1_ref, prepared, tmp_path, name, nproc, layout)
    run = _checkpoint_copy(zero1_ref, "step_000003", tmp_path / "no_universal", drop=("universal.safetensors",))
    assert convert_ckpt.inspect(str(run))["universal"] is False
    codes, out = train_ranks(run, prepared, 2, common + ["parallel.zero_stage=3", "parallel.tp=2"])
    assert codes == [2, 2], out[-4000:]
    assert "tp 1 -> 2" in out and "checkpoint.universal: true" in out


# One ZeRO-1 DP=2 run of 4 steps whose step 2 is non-finite (read-only, shared): the skip policy's run and the
# PP=1 side of the PP=2 comparison.
NAN_AT_2 = ["train.steps=4", "parallel.zero_stage=1", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def nan_at_2_pp1(prepared, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("nan_at_2") / "pp1"
    res = train(run_dir, prepared, 2, NAN_AT_2, env={"MCD_FAULT_NAN_STEPS": "2"})
    assert res.returncode == 0, res.stdout[-4000:]
    return run_dir


def test_nonfinite_policy_skips_then_aborts(prepared, nan_at_2_pp1, tmp_path):
    """One NaN step is skipped and counted; K in a row aborts with the 'diverged' exit code (3)."""
    rows = [json.loads(x) for x in open(nan_at_2_pp1 / "metrics.jsonl") if '"train"' in x]
    assert rows[-1]["skipped_total"] == 1
    assert all(r["loss"] == r["loss"] for r in rows if r["step"] != 2)
    codes, out = train_ranks(tmp_path / "abort", prepared, 2, ["train.steps=6", "checkpoint.every=0",
                                                               "train.max_nonfinite_in_a_row=2"],
                             env={"MCD_FAULT_NAN_STEPS": "2,3"})
    assert codes == [3, 3], out[-4000:]
    assert "non-finite losses in a row" in out


def test_pp2_skips_a_nonfinite_step_like_pp1(prepared, nan_at_2_pp1, tmp_path):
    """The pipeline engine (PP=2) skips a NaN step through mcd_scale/training/nonfinite.py and ends in the state
    the plain engine (PP=1, DP=2) reaches with the same skip: same losses after it (fp32, rtol 1e-5)."""
    common = NAN_AT_2
    b = train(tmp_path / "pp2", prepared, 2, common + ["parallel.pp=2"], env={"MCD_FAULT_NAN_STEPS": "2"})
    assert b.returncode == 0, b.stdout[-4000:]
    for run in (nan_at_2_pp1, tmp_path / "pp2"):
        rows = [json.loads(x) for x in open(run / "metrics.jsonl") if '"train"' in x]
        assert rows[-1]["skipped_total"] == 1, (run, rows[-1])
        assert [r["step"] for r in rows if r["loss"] != r["loss"]] == [2], run
    la, lb = losses(nan_at_2_pp1), losses(tmp_path / "pp2")
    # Step 3 after a skipped step 2 differs from step 3 after a real update: the comparison is not vacuous.
    c = train(tmp_path / "pp1_clean", prepared, 2, common)
    assert c.returncode == 0, c.stdout[-4000:]
    assert abs(losses(tmp_path / "pp1_clean")[3] - la[3]) > 1e-4
    assert_close(lb, la, [1, 3, 4], 1e-5, "PP=2 vs PP=1 around a skipped step")


def test_preemption_saves_and_exits_for_requeue(prepared, tmp_path):
    """SIGTERM -> checkpoint at the step boundary, exit code 4; the requeued job finishes from there."""
    run = tmp_path / "pre"
    codes, out = train_ranks(run, prepared, 2, ["train.steps=5", "checkpoint.every=0"],
                             env={"MCD_FAULT_SIGTERM_AT_STEP": "2"})
    assert codes == [4, 4], out[-4000:]
    # the signal (after step 2) rides on the next step's one collective: the ranks agree and save after step 3
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"
    second = train(run, prepared, 2, ["train.steps=5", "checkpoint.every=0"])
    assert second.returncode == 0, second.stdout[-4000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000005"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tb"))


def test_warning_signal_after_the_run_exits_0(prepared, tmp_path):
    """SLURM's warning signal (SIGUSR1) reaching a rank after fit() returned, before the process exits (logger close,
    plots, process-group shutdown, interpreter exit): the run is complete, so exit 0, not SIGUSR1's default action
    (killed: -10 here, 138 in a shell). Each rank sends itself the signal at that point (no timing race)."""
    run = tmp_path / "late"
    codes, out = train_ranks(run, prepared, 2, ["train.steps=2", "checkpoint.every=0"],
                             env={"MCD_FAULT_SIGNAL_AFTER_WORK": "1"})
    assert codes == [0, 0], out[-4000:]
    assert out.count("train: preemption signal after the run finished; exit 0") == 2, out[-4000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"


def main_inprocess_handlers(run_dir: str, prepared: str) -> dict:
    """One rank (tests.mp.run_ranks): mcd_scale.train.main called as a library, with the caller's own
    SIGUSR1/SIGTERM handlers installed; are they the ones installed when it returns?"""
    import signal

    from mcd_scale.train import main

    def callers_handler(signum, frame):
        pass

    sigs = (signal.SIGUSR1, signal.SIGTERM)
    for sig in sigs:
        signal.signal(sig, callers_handler)
    argv = ["--config", "configs/tiny/teacher.yaml", "--set", f"data.path={prepared}", "--set", f"run.dir={run_dir}"]
    for o in TINY + ["train.steps=1", "checkpoint.every=0"]:
        argv += ["--set", o]
    code = main(argv)
    return {"code": code, "restored": [signal.getsignal(sig) is callers_handler for sig in sigs]}


def test_inprocess_main_puts_the_signal_handlers_back(prepared, tmp_path):
    """Only the process entry keeps its preemption handlers until exit; a caller of main() gets its own back."""
    from tests.mp import run_ranks

    [res] = run_ranks("tests.test_train_teacher:main_inprocess_handlers", 1,
                      kwargs={"run_dir": str(tmp_path / "inprocess"), "prepared": prepared}, timeout=300)
    assert res == {"code": 0, "restored": [True, True]}
