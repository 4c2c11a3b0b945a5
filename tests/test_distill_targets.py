"""Teacher targets: exact log-probs, top-k + tail, and the per-sample shard packing."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mcd_scale.distill.targets import TopKTargets, full_from_logits, pack_sample, topk_from_logits, unpack_samples

V = 11
PADDED = 16  # >= V + 1, like the model's padded output table


def _logits(b: int, l: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(b, l, PADDED, generator=g, dtype=dtype)
    logits[..., V] = 50.0  # a huge mask logit: must be ignored by SUBS
    logits[..., V + 1:] = float("-inf")  # padding
    return logits


def _z_s(b: int, l: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, V, (b, l), generator=g)
    z[torch.rand(b, l, generator=g) < 0.6] = V
    return z


def test_full_from_logits_matches_direct_softmax_with_temperature():
    logits = _logits(2, 3)
    tau = 0.8
    got = full_from_logits(logits, V, tau)
    for b in range(2):
        for l in range(3):
            row = [math.exp(float(logits[b, l, v]) / tau) for v in range(V)]
            z = sum(row)
            want = torch.tensor([math.log(r / z) for r in row], dtype=torch.float64)
            # tolerance: float64 log_softmax vs math.log of python floats: ~1e-15; atol 1e-6 is loose but still catches
            # a
            # missing temperature (O(0.1))
            assert torch.allclose(got[b, l].double(), want, atol=1e-6)
    assert got.shape == (2, 3, V) and got.dtype == torch.float64  # float64 in, float64 out


def test_full_from_logits_upcasts_half_and_rejects_bad_input():
    logits = _logits(1, 2, dtype=torch.float32)
    got = full_from_logits(logits.to(torch.bfloat16), V)
    assert got.dtype == torch.float32
    with pytest.raises(ValueError, match="temperature"):
        full_from_logits(logits, V, 0.0)
    with pytest.raises(ValueError, match="columns"):
        full_from_logits(logits[..., :V], V)


@pytest.mark.parametrize("k", [1, 4, V])
def test_topk_rows_ids_and_tail(k: int):
    logits, z_s, tau = _logits(3, 5), _z_s(3, 5), 0.9
    tgt = topk_from_logits(logits, z_s, V, k, tau, logp_dtype=torch.float64)
    positions = z_s == V
    assert torch.equal(tgt.positions, positions)
    rows = [(b, l) for b in range(3) for l in range(5) if positions[b, l]]  # row-major order
    assert tgt.ids.shape == (len(rows), k) and tgt.ids.dtype == torch.int32
    for i, (b, l) in enumerate(rows):
        probs = torch.softmax(logits[b, l, :V] / tau, dim=-1)
        order = torch.argsort(probs, descending=True)[:k]
        assert set(tgt.ids[i].tolist()) == set(order.tolist())
        # tolerance: float64 log_softmax vs log(softmax): a few ulp of |logp| <= ~10
        assert torch.allclose(tgt.logp[i], probs[tgt.ids[i].long()].log(), atol=1e-12)
        leftover = 1.0 - float(probs[order].sum())
        if k == V:
            assert tgt.tail_logp[i] == float("-inf")
        else:
            assert math.isclose(float(tgt.tail_logp[i]), math.log(leftover), rel_tol=1e-9)


def test_topk_tail_is_accurate_when_topk_holds_almost_all_mass():
    # 1 - sum(topk) would cancel to 0 in float32; the log-sum-exp form keeps the ~e-30 tail.
    logits = torch.full((1, 1, PADDED), -70.0)
    logits[0, 0, 0] = 0.0
    tgt = topk_from_logits(logits, torch.tensor([[V]]), V, 1)
    want = math.log((V - 1) * math.exp(-70.0))  # log of (V-1) equal tiny masses (normaliser ~1)
    assert math.isclose(float(tgt.tail_logp[0]), want, rel_tol=1e-5)


def test_topk_validation():
    logits, z_s = _logits(1, 2), _z_s(1, 2)
    with pytest.raises(ValueError, match="top_k"):
        topk_from_logits(logits, z_s, V, V + 1)
    with pytest.raises(ValueError, match="does not match"):
        topk_from_logits(logits, z_s[:, :1], V, 2)


def test_pack_unpack_round_trip_with_compact_dtypes():
    logits, z_s = _logits(3, 7, seed=3), _z_s(3, 7, seed=4)
    z_s[1] = 0  # a sample with no masked position at s
    tgt = topk_from_logits(logits, z_s, V, 4)
    packed = [pack_sample(tgt, b) for b in range(3)]
    for rec in packed:
        assert rec["topk_ids"].dtype == np.uint16 and rec["topk_pos"].dtype == np.uint16
        assert rec["topk_logp"].dtype == np.float16 and rec["tail_logp"].dtype == np.float32
    assert packed[1]["topk_ids"].shape == (0, 4)
    back = unpack_samples(packed, seq_len=7, vocab_size=V)
    assert torch.equal(back.positions, tgt.positions)
    assert torch.equal(back.ids, tgt.ids)
    # tolerance: float16 keeps 11 bits: rounding <= 2^-11 = 4.9e-4 relative; rtol 1e-3 + atol 2e-3 (|logp| < ~4)
    assert torch.allclose(back.logp, tgt.logp.float(), atol=2e-3, rtol=1e-3)  # float16 storage
    assert torch.equal(back.tail_logp, tgt.tail_logp.float())


def test_pack_uses_int32_for_large_vocabularies():
    big_v = 70_000
    positions = torch.tensor([[True, False]])
    tgt = TopKTargets(torch.tensor([[69_999, 3]], dtype=torch.int32), torch.zeros(1, 2), torch.zeros(1),
                      positions, big_v)
    rec = pack_sample(tgt, 0)
    assert rec["topk_ids"].dtype == np.int32 and int(rec["topk_ids"][0, 0]) == 69_999
    assert torch.equal(unpack_samples([rec], 2, big_v).ids, tgt.ids)


def test_unpack_rejects_corrupt_records():
    tgt = topk_from_logits(_logits(1, 6), _z_s(1, 6), V, 3)
    rec = pack_sample(tgt, 0)
    with pytest.raises(KeyError, match="tail_logp"):
        unpack_samples([{k: v for k, v in rec.items() if k != "tail_logp"}], 6, V)
    with pytest.raises(ValueError, match="topk_pos"):
        unpack_samples([dict(rec, topk_pos=rec["topk_pos"][::-1].copy())], 6, V)
    with pytest.raises(ValueError, match="topk_ids outside"):
        unpack_samples([dict(rec, topk_ids=np.full_like(rec["topk_ids"], V))], 6, V)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        unpack_samples([dict(rec, tail_logp=rec["tail_logp"][:-1])], 6, V)
