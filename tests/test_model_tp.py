"""Tensor parallelism: TP=2 equals TP=1 (logits, gradients, init), loads any layout, dropout streams."""
from __future__ import annotations

import torch

from tests.mp import run_ranks

OVERRIDES = ["model.vocab_size=250", "model.hidden=64", "model.heads=4", "model.ffn_hidden=128",
             "model.layers=2", "model.seq_len=16", "model.cond_dim=32"]


def tiny_cfg(extra=()):
    from mcd_scale.config import load_config

    return load_config(["configs/tiny/teacher.yaml"], OVERRIDES + list(extra))


def sample_inputs(cfg, batch=2):
    from mcd_scale.rng import keyed_generator

    gen = keyed_generator("test-model-inputs", 7)
    z = torch.randint(0, cfg.model.vocab_size + 1, (batch, cfg.model.seq_len), generator=gen)
    t = torch.rand(batch, generator=gen)
    w = torch.randn(batch, cfg.model.seq_len, cfg.model.padded_vocab, generator=gen)
    return z, t, w


def full_grads(module, dims=None) -> dict[str, torch.Tensor]:
    """Gradients gathered to full logical tensors (TP shards concatenated)."""
    import torch.distributed as dist

    from mcd_scale.model.logical import logical_parameters

    out = {}
    for name, p in logical_parameters(module):
        g = p.grad.detach().clone()
        if dims is not None and dims.tp > 1 and p.tp_split_dim is not None:
            parts = [torch.empty_like(g) for _ in range(dims.tp)]
            dist.all_gather(parts, g, group=dims.tp_group)
            g = torch.cat(parts, dim=p.tp_split_dim)
        out[name] = g
    return out


def perturbed(state: dict, seed: int) -> dict:
    """A different, deterministic full state (to check loading really writes every tensor)."""
    from mcd_scale.rng import keyed_generator

    gen = keyed_generator("test-perturb", seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in state.items()}


def _tp_worker(cases):
    from mcd_scale.parallel.distributed import init_distributed

    dims = init_distributed(tp=2, pp=1)
    return [_tp_case(dims, extra, load_state) for extra, load_state in cases]


def _tp_case(dims, extra, load_state):
    import torch.distributed as dist

    from mcd_scale.model import build_model, full_state_dict, gather_vocab_logits, load_full_state_dict
    from mcd_scale.model.rng_tracker import DATA_PARALLEL_RNG, MODEL_PARALLEL_RNG

    cfg = tiny_cfg(extra)
    model = build_model(cfg, dims)
    init_state = full_state_dict(model, dims)  # fp32, compared exactly
    model.double()  # logits/grads compared in fp64: see _check_case
    z, t, w = sample_inputs(cfg)
    logits = gather_vocab_logits(model(z, t.double()), dims.tp, dims.tp_group)
    (logits * w.double()).sum().backward()
    grads = full_grads(model, dims)

    load_full_state_dict(model, load_state, dims)
    with torch.no_grad():
        loaded_logits = gather_vocab_logits(model(z, t.double()), dims.tp, dims.tp_group)
    model.float()  # the loaded values are fp32 values, so fp64 -> fp32 is exact
    reloaded = full_state_dict(model, dims)

    # Dropout: the replicated residual stream must stay identical across TP ranks in training.
    drop_cfg = tiny_cfg(list(extra) + ["model.dropout=0.3"])
    drop_model = build_model(drop_cfg, dims).train()
    h = drop_model.embed(z)
    c = drop_model.time(t) if drop_model.time is not None else None
    out = drop_model.blocks[0](h, c).detach()
    peers = [torch.empty_like(out) for _ in range(2)]
    dist.all_gather(peers, out, group=dims.tp_group)
    with drop_model.rng.fork(MODEL_PARALLEL_RNG):
        tp_draw = torch.rand(8)
    with drop_model.rng.fork(DATA_PARALLEL_RNG):
        shared_draw = torch.rand(8)
    return dict(logits=logits.detach(), grads=grads, init_state=init_state, loaded_logits=loaded_logits,
                reloaded=reloaded, block_out_equal=bool(torch.equal(peers[0], peers[1])),
                tp_draw=tp_draw, shared_draw=shared_draw)


def _reference(extra, load_state):
    from mcd_scale.model import build_model, full_state_dict, load_full_state_dict

    cfg = tiny_cfg(extra)
    model = build_model(cfg)
    init_state = full_state_dict(model)
    model.double()
    z, t, w = sample_inputs(cfg)
    logits = model(z, t.double())
    (logits * w.double()).sum().backward()
    grads = full_grads(model)
    load_full_state_dict(model, load_state)
    with torch.no_grad():
        loaded_logits = model(z, t.double())
    return logits.detach(), grads, init_state, loaded_logits


CASES = ([], ["model.time_conditioning=true", "model.tie_embeddings=true"])


def test_tp2_matches_tp1():
    """Plain and (time-conditioned + tied) models, one 2-rank launch for both (start-up dominates)."""
    from mcd_scale.model import build_model, full_state_dict

    cases = [(extra, perturbed(full_state_dict(build_model(tiny_cfg(extra))), seed=3)) for extra in CASES]
    results = run_ranks("tests.test_model_tp:_tp_worker", 2, {"cases": cases}, timeout=300)
    for i, (extra, load_state) in enumerate(cases):
        _check_case(extra, load_state, [results[0][i], results[1][i]])


def _check_case(extra, load_state, res):
    ref_logits, ref_grads, ref_init, ref_loaded = _reference(extra, load_state)
    # TP=2 sums the same products in a different order (row-parallel partial sums, all-reduces, a
    # CPU-dependent GEMM blocking), so it equals TP=1 only up to rounding. In fp32 that rounding reached
    # 1.4e-5 on embed.weight's gradient (a sum over B*L*Vp products) on some CPUs. In fp64 (unit roundoff
    # 1.1e-16) the same reorderings differ by <= 1.5e-13 here (gradients up to ~300); 1e-10 abs + 1e-10 rel
    # leaves >= 1e3x headroom for any CPU's summation order and is far below what a wrong shard, a missing
    # reduce or a wrong init changes (O(1e-2) and up).
    for r in res:
        assert r["logits"].dtype == torch.float64 and ref_logits.dtype == torch.float64
        torch.testing.assert_close(r["logits"], ref_logits, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(r["loaded_logits"], ref_loaded, atol=1e-10, rtol=1e-10)
        assert r["block_out_equal"], "dropout broke the replication of the residual stream across TP ranks"
        assert set(r["grads"]) == set(ref_grads)
        for name, g in ref_grads.items():
            torch.testing.assert_close(r["grads"][name], g, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")
    init, reloaded = res[0]["init_state"], res[0]["reloaded"]
    assert res[1]["init_state"] == {} and res[1]["reloaded"] == {}, "full_state_dict is rank-0 only"
    assert set(init) == set(ref_init) and set(reloaded) == set(load_state)
    for name in ref_init:
        assert torch.equal(init[name], ref_init[name]), f"init of {name} depends on the TP layout"
        assert torch.equal(reloaded[name], load_state[name]), f"{name} did not round-trip through TP=2"
    assert not torch.equal(res[0]["tp_draw"], res[1]["tp_draw"]), "model-parallel stream equal across TP ranks"
    assert torch.equal(res[0]["shared_draw"], res[1]["shared_draw"]), "shared stream differs across TP ranks"
