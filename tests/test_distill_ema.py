"""EMA of the weights: the recursion, state round trip, swap_in, ZeRO-3 partitions."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mcd_scale.distill.ema import EMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    m[1].bias.requires_grad_(False)  # frozen parameters are not averaged
    return m


def _perturb(model: nn.Module, step: int) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.1 * (step + 1) * (i + 1))


def test_matches_hand_computed_ema():
    model, decay = _model(), 0.9
    ema = EMA(model.parameters(), decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected = [p.detach().clone() for p in trainable]
    for step in range(4):
        _perturb(model, step)
        ema.update()
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, trainable)]
    assert len(ema.shadow) == 3 and ema.num_updates == 4
    for s, e in zip(ema.shadow, expected):
        # tolerance: float32 EMA via lerp_ vs d*e + (1-d)*p: a few float32 roundings per step on values ~1 (6e-8 each),
        # 4 steps
        assert torch.allclose(s, e, atol=1e-6)
        assert s.dtype == torch.float32


def test_shadow_is_float32_for_bf16_weights():
    model = _model().to(torch.bfloat16)
    ema = EMA(model.parameters(), 0.999)
    before = [s.clone() for s in ema.shadow]
    _perturb(model, 0)
    ema.update()
    # a 0.1% step of the difference: invisible in bf16, kept in float32
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    assert all(not torch.equal(s, b) for s, b in zip(ema.shadow, before))


def test_state_round_trip_and_mismatch_error():
    model = _model()
    ema = EMA(model.parameters(), 0.99)
    _perturb(model, 0)
    ema.update()
    state = ema.state_dict()
    other = EMA(_model().parameters(), 0.5)
    other.load_state_dict(state)
    assert other.decay == 0.99 and other.num_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    _perturb(model, 1)
    ema.update()  # the saved state is a copy, not a view of the live shadow
    assert not torch.equal(state["shadow"][0], ema.shadow[0])
    with pytest.raises(ValueError, match="saved shape"):
        EMA(nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2, bias=False)).parameters(), 0.9).load_state_dict(state)
    with pytest.raises(ValueError, match="3 tensors"):
        EMA(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).parameters(), 0.9).load_state_dict(state)


def test_swap_in_uses_shadow_and_restores_even_on_error():
    model = _model()
    ema = EMA(model.parameters(), 0.5)
    _perturb(model, 0)
    ema.update()
    trained = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(2, 4)
    with ema.swap_in():
        assert torch.equal(model[0].weight, ema.shadow[0])
        assert torch.equal(model[1].bias, trained[3])  # frozen params untouched
        y_ema = model(x)
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    assert not torch.allclose(y_ema, model(x))
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swap_in():
            raise RuntimeError("boom")
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))


def test_zero3_partitions_are_averaged_not_the_placeholder():
    """Under ZeRO-3, p.data is an empty placeholder and p.ds_tensor holds this rank's shard."""
    params = [nn.Parameter(torch.empty(0)) for _ in range(2)]
    for i, p in enumerate(params):
        p.ds_tensor = torch.full((3 + i,), float(i))  # local partition
    released = []
    ema = EMA(params, 0.75, release_cache=lambda: released.append(1))
    assert [tuple(s.shape) for s in ema.shadow] == [(3,), (4,)]
    for p in params:
        p.ds_tensor.add_(4.0)
    ema.update()
    # tolerance: allclose defaults (rtol 1e-5, atol 1e-8); lerp with weight 0.25 on small integers is exact in float32
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.75 * 0 + 0.25 * 4.0))
    assert torch.allclose(ema.shadow[1], torch.full((4,), 0.75 * 1 + 0.25 * 5.0))
    with ema.swap_in():
        assert torch.equal(params[1].ds_tensor, ema.shadow[1]) and released == [1]
    assert torch.equal(params[1].ds_tensor, torch.full((4,), 5.0)) and released == [1, 1]
    assert params[0].data.numel() == 0  # the placeholder was never touched
    with pytest.raises(RuntimeError, match="release_cache"):
        with EMA(params, 0.75).swap_in():
            pass


def test_rejects_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMA(_model().parameters(), 1.0)
