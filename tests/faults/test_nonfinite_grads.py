"""NaN/Inf in the gradients of ONE rank while every loss stays finite (docs/reliability.md, "Non-finite gradient").

Without the gradient guard (mcd_scale/training/nonfinite.py) the data-parallel reduction spreads the NaN to every rank
and the optimizer step -- even the lr-0 skip step -- writes it into the weights, which the next checkpoint saves.
Both menus: data parallel (pp=1) and the pipeline (pp=2, where only the last stage ever sees a loss).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from mcd_scale.training.nonfinite import GradFiniteGuard
from tests.faults import common


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_guard_flags_and_zeroes_a_nonfinite_gradient(bad):
    w = torch.nn.Parameter(torch.ones(3))
    guard = GradFiniteGuard([w], torch.device("cpu"))
    (w * torch.tensor([1.0, bad, 2.0])).sum().backward()
    assert bool(guard.bad) and torch.equal(w.grad, torch.zeros(3))
    guard.reset()
    w.grad = None
    (w * torch.tensor([1.0, 3.0, 2.0])).sum().backward()
    assert not bool(guard.bad) and torch.equal(w.grad, torch.tensor([1.0, 3.0, 2.0]))


def test_one_rank_nonfinite_gradient_skips_everywhere_then_aborts(corpus, tmp_path):
    """Rank 1's gradient is NaN in steps 2, 4 and 5 (its loss finite). Step 2: every rank skips (counted), training
    goes on with finite losses; steps 4-5: two in a row = train.max_nonfinite_in_a_row -> exit 3 on every rank.
    Every checkpoint written on the way (one per step) holds finite weights only."""
    _skips_everywhere_then_aborts(corpus, tmp_path, [], "1:2,4,5")


@pytest.mark.parametrize("zero", [0, pytest.param(1, marks=pytest.mark.skipif(
    not common.long_variant(), reason="long variant (tools/dev/faults.py): one more launch"))])
def test_pp2_one_stage_nonfinite_gradient_skips_everywhere_then_aborts(corpus, tmp_path, zero):
    """The pipeline menu (pp=2, 2 ranks: one stage each): rank 0's gradient is NaN in steps 2, 4 and 5. Rank 0 is the
    first stage, which never sees a loss: only the gradient guard can notice. Same outcome as pp=1. Without the
    guard, ZeRO-0 wrote NaN into every weight of both stages at step 2 (the global clip norm is NaN on every
    stage); with ZeRO-1 DeepSpeed's optimizer dropped the update on its own (inf norm), uncounted, and the run
    ended with exit 0."""
    _skips_everywhere_then_aborts(corpus, tmp_path, ["parallel.pp=2", f"parallel.zero_stage={zero}"], "0:2,4,5")


def _skips_everywhere_then_aborts(corpus, tmp_path, overrides, fault):
    run = str(tmp_path / "run")
    res = common.launch(common.train_argv("teacher", run, corpus, None, [
        "train.steps=6", "checkpoint.every=1", "checkpoint.keep_last=0", "train.max_nonfinite_in_a_row=2",
        *overrides]), 2, env={"MCD_FAULT_NONFINITE_GRAD": fault})
    assert res.codes == [3, 3], res.log
    by_step = {r["step"]: r for r in common.rows(run) if r.get("split") == "train"}
    assert sorted(by_step) == [1, 2, 3, 4], by_step  # step 5 aborts before its log line
    assert [s for s, r in by_step.items() if not common.finite(r["loss"])] == [2, 4]
    assert [by_step[s]["skipped_total"] for s in range(1, 5)] == [0, 1, 1, 2]
    assert "step 5: non-finite loss, update skipped (2 in a row)" in res.log
    assert "aborting: 2 non-finite losses in a row" in res.log
    tags = common.checkpoint_tags(run)
    assert tags == [f"step_{s:06d}" for s in range(1, 5)], tags  # step 5 aborted: nothing saved
    for tag in tags:
        path = os.path.join(run, "checkpoints", tag, "model.safetensors")
        assert common.nonfinite_tensors(path) == [], f"{tag}: non-finite weights saved"
        for name in sorted(os.listdir(os.path.dirname(path))):  # DeepSpeed's files: Adam's moments, fp32 copies
            if name.endswith(".pt"):
                bad = _nonfinite_in(torch.load(os.path.join(os.path.dirname(path), name), weights_only=False))
                assert bad == [], f"{tag}/{name}: non-finite {bad}"
    # The skipped step changed nothing: step 2's weights are step 1's (lr 0 on every rank, zero bad gradient).
    from safetensors.torch import load_file

    w1 = load_file(os.path.join(run, "checkpoints", tags[0], "model.safetensors"))
    w2 = load_file(os.path.join(run, "checkpoints", tags[1], "model.safetensors"))
    w3 = load_file(os.path.join(run, "checkpoints", tags[2], "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1), "the skipped step 2 changed the weights"
    assert any(not torch.equal(w2[k], w3[k]) for k in w2), "step 3 (finite) did not train"
    assert math.isfinite(by_step[3]["loss"])


def _nonfinite_in(obj, path="") -> list:
    """Paths of the floating tensors holding a NaN/Inf anywhere in a (nested) checkpoint object."""
    if torch.is_tensor(obj):
        return [path] if obj.is_floating_point() and not torch.isfinite(obj).all() else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    return [p for k, v in items for p in _nonfinite_in(v, f"{path}/{k}")]
