"""Single-process model tests: forward/backward variants, activation checkpointing with dropout,
strict loading, safetensors, parameter counting on the meta device, the RNG tracker."""
from __future__ import annotations

import pytest
import torch

from tests.test_model_tp import sample_inputs, tiny_cfg


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@torch.no_grad()
def _activate_modulation(model):
    """adaLN-Zero blocks are the identity at init; give the modulation deterministic non-zero values so
    the blocks (and their dropout) matter."""
    from mcd_scale.model.logical import logical_parameters
    from mcd_scale.rng import keyed_generator

    gen = keyed_generator("test-modulation", 0)
    for name, p in logical_parameters(model):
        if "modulation" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_activation_checkpointing_reproduces_dropout(time_conditioning):
    """Grads with checkpointing == without, dropout on: the recompute must replay the masks."""
    from mcd_scale.model import build_model

    extra = ["model.dropout=0.2", f"model.time_conditioning={str(time_conditioning).lower()}"]
    z, t, w = sample_inputs(tiny_cfg(extra))
    grads, outs = [], []
    for ckpt in (False, True):
        model = build_model(tiny_cfg(extra + [f"parallel.activation_checkpointing={str(ckpt).lower()}"])).train()
        _activate_modulation(model)
        assert all(b.activation_checkpointing == ckpt for b in model.blocks)
        out = model(z, t)
        (out * w).sum().backward()
        outs.append(out.detach())
        grads.append(_grads(model))
    assert torch.equal(outs[0], outs[1])
    for name in grads[0]:
        # tolerance: activation checkpointing recomputes the same float32 ops on the same inputs in the same process:
        # identical up to nondeterministic thread reductions (none on CPU here); 1e-6 is a margin, not a bound
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")
    # Dropout is really on: eval output differs from the training output.
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(z, t), outs[1])


def test_time_conditioning_runs_and_uses_t():
    from mcd_scale.model import build_model

    cfg = tiny_cfg(["model.time_conditioning=true"])
    model = build_model(cfg)
    z, t, _ = sample_inputs(cfg)
    # adaLN-Zero: modulation starts at zero, so t has no effect at init ...
    assert torch.equal(model(z, t), model(z, 1 - t))
    _activate_modulation(model)  # ... and does once the modulation is trained away from zero.
    assert not torch.allclose(model(z, t), model(z, 1 - t))
    with pytest.raises(ValueError, match="pass t"):
        model(z)
    plain = build_model(tiny_cfg())
    assert plain(z).shape == (z.shape[0], z.shape[1], cfg.model.padded_vocab)


def test_init_is_deterministic_and_sensible():
    from mcd_scale.model import build_model, full_state_dict

    a, b = full_state_dict(build_model(tiny_cfg())), full_state_dict(build_model(tiny_cfg()))
    other = full_state_dict(build_model(tiny_cfg(["train.seed=99"])))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.weight"], other["embed.weight"])
    assert torch.all(a["blocks.0.norm1.weight"] == 1) and torch.all(a["blocks.0.attn.qkv.bias"] == 0)
    std = tiny_cfg().model.init_std
    assert abs(a["embed.weight"].std().item() - std) < 0.1 * std
    layers = tiny_cfg().model.layers
    assert abs(a["blocks.0.mlp.fc2.weight"].std().item() - std / (2 * layers) ** 0.5) < 0.1 * std


def test_load_is_strict_and_safetensors_round_trip(tmp_path):
    from mcd_scale.model import build_model, full_state_dict, load_full_state_dict, load_safetensors, save_safetensors
    from mcd_scale.model.weights import safetensors_metadata

    model = build_model(tiny_cfg())
    state = full_state_dict(model)
    path = str(tmp_path / "model.safetensors")
    save_safetensors(state, path, metadata={"step": 7})
    loaded = load_safetensors(path)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert safetensors_metadata(path) == {"step": "7"}
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left

    missing = {k: v for k, v in state.items() if k != "head.weight"}
    with pytest.raises(KeyError, match="head.weight"):
        load_full_state_dict(model, missing)
    with pytest.raises(KeyError, match="blocks.9.mlp.fc1.weight"):
        load_full_state_dict(model, {**state, "blocks.9.mlp.fc1.weight": torch.zeros(1)})
    bad = dict(state, **{"final.norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="final.norm.weight"):
        load_full_state_dict(model, bad)


def test_teacher_1b_parameter_count_on_meta():
    from mcd_scale.config import load_config
    from mcd_scale.model import DiffusionTransformer
    from mcd_scale.model.flops import count_parameters, train_flops_per_token

    cfg = load_config(["configs/teacher_1b.yaml"])
    with torch.device("meta"):
        model = DiffusionTransformer(cfg.model, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert 1.0e9 <= n <= 1.3e9, n
    assert n == count_parameters(cfg.model)
    for extra in (["model.time_conditioning=true", "model.tie_embeddings=true"], []):
        small = tiny_cfg(extra)
        with torch.device("meta"):
            m = DiffusionTransformer(small.model)
        assert sum(p.numel() for p in m.parameters()) == count_parameters(small.model)
    m = cfg.model
    assert train_flops_per_token(m) == 6 * (n - m.padded_vocab * m.hidden) + 12 * m.layers * m.hidden * m.seq_len


def test_rng_tracker_streams_and_restore():
    from mcd_scale.model.rng_tracker import DATA_PARALLEL_RNG, MODEL_PARALLEL_RNG, DropoutRNG

    r0, r1 = DropoutRNG(5, tp_rank=0), DropoutRNG(5, tp_rank=1)
    before = torch.get_rng_state()
    with r0.fork(MODEL_PARALLEL_RNG):
        a0 = torch.rand(4)
    with r1.fork(MODEL_PARALLEL_RNG):
        a1 = torch.rand(4)
    with r0.fork(DATA_PARALLEL_RNG):
        s0 = torch.rand(4)
    with r1.fork(DATA_PARALLEL_RNG):
        s1 = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork leaked into the global RNG"
    assert not torch.equal(a0, a1) and torch.equal(s0, s1)
    with r0.fork(DATA_PARALLEL_RNG):
        assert not torch.equal(torch.rand(4), s0), "the stream did not advance"
    with pytest.raises(KeyError):
        with r0.fork("nope"):
            pass
