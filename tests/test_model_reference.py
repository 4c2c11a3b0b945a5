"""The network against an independent fp64 reference written out by hand (not a layout of itself).

Every other model test compares the model with itself (TP=2 vs TP=1, checkpointing on/off, pipeline
form), so a bug shared by every layout passes them. Here one block and the full forward are recomputed
from the weights with plain tensor algebra: LayerNorm, adaLN (shift/scale/gate), softmax(QK^T/sqrt(d))V
with rotary applied to queries AND keys (as a complex rotation, not the model's half-split code), no
mask, GELU(tanh) MLP, the sinusoidal time embedding, the untied or tied vocabulary head.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.test_model_tp import tiny_cfg

# fp64 everywhere (unit roundoff 1.1e-16); the model and the reference differ only in operation order,
# which costs ~1e-14 at these magnitudes. 1e-10 is far below what any real bug changes (a wrong
# attention scale moves logits by O(0.1), rotary on one side by O(0.1)).
TOL = dict(atol=1e-10, rtol=1e-10)


@torch.no_grad()
def _randomised(cfg):
    """The model in fp64 with every parameter random (biases, norms and adaLN included: zero/one inits
    would hide a missing bias, norm weight or modulation term)."""
    from mcd_scale.model import build_model
    from mcd_scale.rng import keyed_generator

    model = build_model(cfg).double().eval()
    gen = keyed_generator("test-model-reference", 0)
    for name, p in sorted(model.named_parameters()):
        scale = 0.5 if p.dim() > 1 else 0.2
        base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        p.copy_(base + scale * torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(p.shape[-1] if p.dim() > 1 else 1))
    return model


def _inputs(cfg, batch=2):
    from mcd_scale.rng import keyed_generator

    gen = keyed_generator("test-model-reference-inputs", 0)
    z = torch.randint(0, cfg.model.vocab_size + 1, (batch, cfg.model.seq_len), generator=gen)
    t = torch.rand(batch, generator=gen, dtype=torch.float64)
    return z, t


# ------------------------------------------------------------------------------------------------
# The reference, by hand
# ------------------------------------------------------------------------------------------------
def ref_linear(x, lin):
    return x @ lin.weight.T + (lin.bias if lin.bias is not None else 0.0)


def ref_layernorm(x, norm, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * norm.weight + norm.bias


def ref_gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_rotate(x, base):
    """RoPE as a complex rotation: feature pair (i, i + d/2) is the complex number x_i + j*x_{i+d/2},
    multiplied by exp(j * pos * base^(-2i/d)). ``x [B, L, heads, d]``."""
    d, length = x.shape[-1], x.shape[1]
    freq = base ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    angle = torch.arange(length, dtype=torch.float64)[:, None] * freq[None]  # [L, d/2]
    zc = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.polar(torch.ones_like(angle), angle)[None, :, None]
    return torch.cat([zc.real, zc.imag], dim=-1)


def ref_attention(x, attn, heads, base):
    b, length, hidden = x.shape
    d = hidden // heads
    qkv = ref_linear(x, attn.qkv).view(b, length, heads, 3, d)
    q, k, v = ref_rotate(qkv[..., 0, :], base), ref_rotate(qkv[..., 1, :], base), qkv[..., 2, :]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)  # no mask: bidirectional
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(b, length, hidden)
    return ref_linear(out, attn.proj)


def ref_time(t, time):
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    emb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1)
    silu = lambda y: y * torch.sigmoid(y)  # noqa: E731
    return silu(ref_linear(silu(ref_linear(emb, time.fc1)), time.fc2))


def ref_block(x, c, block, cfg):
    m = cfg.model
    if block.modulation is None:
        shift_a = scale_a = shift_m = scale_m = torch.zeros(x.shape[0], m.hidden, dtype=x.dtype)
        gate_a = gate_m = torch.ones(x.shape[0], m.hidden, dtype=x.dtype)
    else:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = ref_linear(c, block.modulation).chunk(6, dim=-1)
    a = ref_layernorm(x, block.norm1, m.norm_eps) * (1 + scale_a[:, None]) + shift_a[:, None]
    x = x + gate_a[:, None] * ref_attention(a, block.attn, m.heads, m.rope_base)
    h = ref_layernorm(x, block.norm2, m.norm_eps) * (1 + scale_m[:, None]) + shift_m[:, None]
    return x + gate_m[:, None] * ref_linear(ref_gelu_tanh(ref_linear(h, block.mlp.fc1)), block.mlp.fc2)


def ref_forward(model, z, t, cfg):
    m = cfg.model
    x = model.embed.weight[z]
    c = ref_time(t, model.time) if m.time_conditioning else None
    for block in model.blocks:
        x = ref_block(x, c, block, cfg)
    h = ref_layernorm(x, model.final.norm, m.norm_eps)
    if m.time_conditioning:
        shift, scale = ref_linear(c, model.final.modulation).chunk(2, dim=-1)
        h = h * (1 + scale[:, None]) + shift[:, None]
    head = model.embed.weight if m.tie_embeddings else model.head.weight
    return h @ head.T


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------
SMALL = ["model.vocab_size=60", "model.pad_vocab_multiple=64", "model.hidden=32", "model.heads=4",
         "model.ffn_hidden=64", "model.layers=2", "model.seq_len=12", "model.cond_dim=16"]
VARIANTS = {"time_conditioned": ["model.time_conditioning=true"],
            "plain_tied": ["model.time_conditioning=false", "model.tie_embeddings=true"]}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_block_and_forward_match_hand_written_fp64_reference(variant):
    cfg = tiny_cfg(SMALL + VARIANTS[variant])
    model = _randomised(cfg)
    z, t = _inputs(cfg)
    with torch.no_grad():
        x = model.embed(z)
        c = model.time(t) if model.time is not None else None
        if c is not None:
            torch.testing.assert_close(c, ref_time(t, model.time), **TOL)
        got_block = model.blocks[0](x, c)
        want_block = ref_block(x, c, model.blocks[0], cfg)
        assert got_block.dtype == torch.float64
        assert (want_block - x).abs().max() > 0.1, "the block is (nearly) the identity: the test would be weak"
        torch.testing.assert_close(got_block, want_block, **TOL)
        got = model(z, t)
        want = ref_forward(model, z, t, cfg)
    assert want.std() > 0.1, "reference logits nearly constant: the test would be weak"
    torch.testing.assert_close(got, want, **TOL)


def _recorded_scores(model, z, t, monkeypatch):
    """Pre-softmax scores ``q k^T`` of every SDPA call (recorded from the q and k the model passes)."""
    import torch.nn.functional as F

    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        calls.append(q @ k.transpose(-2, -1))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    with torch.no_grad():
        model(z, t)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    return calls


def test_attention_scores_depend_only_on_relative_position(monkeypatch):
    """Same token at every position: with rotary on queries and keys the first block's score matrix
    is Toeplitz (score(i, j) depends on i - j only); rotating one side only makes it depend on i or j.
    And a pattern moved by s positions gives the score of the pair moved by s (shift invariance)."""
    cfg = tiny_cfg(SMALL + ["model.time_conditioning=false"])
    model = _randomised(cfg)
    length = cfg.model.seq_len
    z = torch.full((1, length), 7)
    scores = _recorded_scores(model, z, None, monkeypatch)[0][0]  # first block [heads, L, L]
    for i in range(1, length):
        for j in range(1, length):
            torch.testing.assert_close(scores[:, i, j], scores[:, i - 1, j - 1], **TOL)
    assert (scores[:, 0, 1:] - scores[:, 0, :1]).abs().max() > 1e-3, "scores constant: rotary not applied"

    # Two distinct tokens a, b at positions (p, p + 3) in a background of c: the (a -> b) score is the
    # same wherever the pair sits (the first block sees token embeddings only, so content is local).
    pair_scores = []
    for p in (0, 2, 5):
        zz = torch.full((1, length), 3)
        zz[0, p], zz[0, p + 3] = 11, 19
        s = _recorded_scores(model, zz, None, monkeypatch)[0][0]
        pair_scores.append(torch.stack([s[:, p, p + 3], s[:, p + 3, p]]))
    for other in pair_scores[1:]:
        torch.testing.assert_close(other, pair_scores[0], **TOL)
