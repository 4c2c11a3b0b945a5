"""NaN/Inf in the gradients of ONE rank while every loss stays finite (docs/reliability.md, "Non-finite gradient").

Without the gradient guard (mcd_scale/grad_guard.py) the data-parallel reduction spreads the NaN to every rank
and the optimizer step -- even the lr-0 skip step -- writes it into the weights, which the next checkpoint saves.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from mcd_scale.grad_guard import GradFiniteGuard
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
    run = str(tmp_path / "run")
    res = common.launch(common.train_argv("teacher", run, corpus, None, [
        "train.steps=6", "checkpoint.every=1", "checkpoint.keep_last=0", "train.max_nonfinite_in_a_row=2"]),
        2, env={"MCD_FAULT_NONFINITE_GRAD": "1:2,4,5"})
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
    # The skipped step changed nothing: step 2's weights are step 1's (lr 0 on every rank, zero bad gradient).
    from safetensors.torch import load_file

    w1 = load_file(os.path.join(run, "checkpoints", tags[0], "model.safetensors"))
    w2 = load_file(os.path.join(run, "checkpoints", tags[1], "model.safetensors"))
    w3 = load_file(os.path.join(run, "checkpoints", tags[2], "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1), "the skipped step 2 changed the weights"
    assert any(not torch.equal(w2[k], w3[k]) for k in w2), "step 3 (finite) did not train"
    assert math.isfinite(by_step[3]["loss"])
