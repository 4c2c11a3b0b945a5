"""tools/experiments/noise_conditioned.py and step_ar_head.py: the trajectory identity their pool relies on,
the packing of revealed tokens, and students that start exactly as teacher@16 (docs/results.md)."""
from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools", "experiments"))
sys.path.insert(0, os.path.join(REPO, "tools"))
import noise_conditioned  # noqa: E402
import step_ar_head  # noqa: E402

from mcd_scale.config import load_config  # noqa: E402
from mcd_scale.diffusion.sampling import coupled_sample, sampling_times  # noqa: E402
from mcd_scale.diffusion.schedules import get_schedule  # noqa: E402
from mcd_scale.model.build import build_model  # noqa: E402

V, L = 6, 20


def context_denoiser(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Logits that depend on the neighbours (so the order of reveals matters), V + 2 columns."""
    table = torch.randn(V + 2, V + 2, generator=torch.Generator().manual_seed(0))
    h = table[z]
    return h + 0.7 * h.roll(1, dims=1) - 0.4 * h.roll(-1, dims=1)


def test_pool_sampler_is_the_product_sampler_and_its_state_at_t_is_the_masked_sample():
    sched = get_schedule("loglinear", 1e-3)
    fake = SimpleNamespace(vocab_size=V, seq_len=L, denoiser=context_denoiser)
    steps = 24
    args = argparse.Namespace(fine_steps=steps, pool_seed=3, pool_batch=2)
    x, lp = noise_conditioned._chunk_sample(fake, sched, args, [0, 1, 2], keep_lp=True)
    ref = coupled_sample(context_denoiser, 3, L, steps, V, sched, 3, batch_size=3, greedy_tail=False)
    assert torch.equal(x, ref.tokens)
    # The identity the pool relies on: before fine step m the state is where(u < alpha_m, x, mask), so the
    # kept log-probs of a token equal the network at that masked sample, for every token.
    alphas = sched.alpha(sampling_times(steps))
    u, _ = noise_conditioned.sampler_noise(3, [0, 1, 2], L, V)
    m = noise_conditioned.fine_order(u, alphas, torch.zeros(3, dtype=torch.long), steps)
    for b in range(3):
        for j in range(L):
            k = int(m[b, j])
            z = torch.where(u[b] < alphas[k], x[b], torch.full_like(x[b], V)) if k else torch.full_like(x[b], V)
            want = torch.log_softmax(context_denoiser(z[None], None)[0, j, :V].double(), -1).float()
            # tolerance: kept log-probs are float32 (want is float64 rounded to float32): |logp| < ~20 -> ~1e-6; 1e-5
            assert torch.allclose(lp[b, j], want, atol=1e-5), (b, j, k)
            assert bool(u[b, j] < alphas[k + 1]) and (k == 0 or bool(u[b, j] >= alphas[k]))


def test_gather_revealed_packs_positions_left_in_order():
    reveal = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    vals = torch.arange(12).view(2, 6)
    pos, valid, (got,) = step_ar_head.gather_revealed(reveal, vals)
    assert pos[0].tolist() == [1, 3, 4] and valid[0].tolist() == [True, True, True]
    assert pos[1, 0] == 0 and valid[1].tolist() == [True, False, False]
    assert got[0].tolist() == [1, 3, 4] and got[1, 0] == 6


def _tiny_model():
    cfg = load_config([], ["model.vocab_size=6", "model.seq_len=20", "model.hidden=32", "model.layers=1",
                           "model.heads=2", "model.ffn_hidden=64", "model.pad_vocab_multiple=8", "train.seed=3"])
    return build_model(cfg, None, init=True, dtype=torch.float32).eval()


def test_students_start_as_teacher_at_few_steps():
    sched = get_schedule("loglinear", 1e-3)
    teacher = _tiny_model()

    def den(z, t):
        with torch.no_grad():
            return teacher(z, t).float()

    ref = coupled_sample(den, 3, L, 4, V, sched, 5, batch_size=3, greedy_tail=False).tokens
    head_student = step_ar_head.StepARStudent(_tiny_model_like(teacher), V, head_layers=1)
    got, nfe, passes, _ = step_ar_head.student_sample(head_student, 5, [0, 1, 2], L, 4, V, sched, 16)
    assert torch.equal(got, ref) and nfe == 4 and passes >= 4
    noise_student = noise_conditioned.NoiseConditionedStudent(_tiny_model_like(teacher), V, 4, extra_layers=1)
    got2, _, _ = noise_conditioned.student_sample(noise_student.eval(), 5, [0, 1, 2], L, 4, V, sched, 16)
    assert torch.equal(got2, ref)
    # Training moves them: a nonzero head output changes the samples (not a constant one: LayerNorm follows).
    with torch.no_grad():
        out = head_student.step_head.layers[0]["out"]
        out.bias.copy_(3.0 * torch.randn(out.bias.shape, generator=torch.Generator().manual_seed(1)))
    moved, _, _, _ = step_ar_head.student_sample(head_student, 5, [0, 1, 2], L, 4, V, sched, 16)
    assert not torch.equal(moved, ref)


def _tiny_model_like(model):
    copy = _tiny_model()
    copy.load_state_dict(model.state_dict())
    return copy


def test_reveal_order_experiment_runs_the_product_sampler(tmp_path, monkeypatch):
    import json

    import reveal_order

    from mcd_scale.config import save_resolved
    from mcd_scale.eval.synthetic import MarkovChain2
    from mcd_scale.model.weights import full_state_dict, save_safetensors

    cfg = load_config([], ["model.vocab_size=6", "model.seq_len=16", "model.hidden=32", "model.layers=1",
                           "model.heads=2", "model.ffn_hidden=64", "model.pad_vocab_multiple=8", "train.seed=3"])
    model = build_model(cfg, None, init=True, dtype=torch.float32)
    save_safetensors(full_state_dict(model, None), str(tmp_path / "model.safetensors"))
    save_resolved(cfg, str(tmp_path / "config.resolved.yaml"))
    MarkovChain2(6, branching=2, seed=0, fanout=3).save(str(tmp_path / "chain.json"))
    curve = [{"benchmark": "synthetic", "model": "teacher", "round": 0, "steps": steps, "temperature": 1.0,
              "entropy": h, "quality": q} for steps, pts in ((64, ((0.5, 1.0), (3.0, 2.0))), (4, ((0.5, 2.0), (3.0, 4.0))))
             for h, q in pts]
    (tmp_path / "report.json").write_text(json.dumps(curve))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["reveal_order.py", "--model", f"tiny={tmp_path / 'model.safetensors'}",
                                      "--chain", str(tmp_path / "chain.json"), "--teacher-report",
                                      str(tmp_path / "report.json"), "--out", str(out), "--steps", "4",
                                      "--many-steps", "64", "--temperatures", "1.0", "--num-samples", "6",
                                      "--batch", "4"])
    assert reveal_order.main() == 0
    rows = json.loads((out / "result.json").read_text())["results"]
    assert [(r["order"], r["nfe"]) for r in rows] == [("random", 4.0), ("strided", 4.0)]
    for r in rows:
        # gap closed is read on the two teacher curves at the row's entropy: (few - q) / (few - many).
        few, many = 2.0 + 2.0 * (r["entropy"] - 0.5) / 2.5, 1.0 + (r["entropy"] - 0.5) / 2.5
        if 0.5 <= r["entropy"] <= 3.0:
            # tolerance: float64 interpolation on piecewise-linear curves vs the closed form: rounding / (few - many)
            assert abs(r["gap_closed"] - (few - r["true_nll"]) / (few - many)) < 1e-6
    monkeypatch.setattr(sys, "argv", sys.argv[:-6] + ["--steps", "8"])   # no teacher rows at 8 steps
    with pytest.raises(SystemExit, match="no synthetic teacher rows"):
        reveal_order.main()
