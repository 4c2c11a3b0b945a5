"""The bidirectional transformer block and its parts (one source of truth for the plain model and the
pipeline form).

Block (pre-norm; with adaLN when time-conditioned, DiT/MDLM style)::

    a = LN1(x) [* (1 + scale_a) + shift_a]
    x = x + [gate_a *] Dropout_shared(Proj_row(SDPA(RoPE(Q), RoPE(K), V, dropout_tp)))   # QKV: column
    m = LN2(x) [* (1 + scale_m) + shift_m]
    x = x + [gate_m *] Dropout_shared(FC2_row(GELU_tanh(FC1_col(m))))

Tensor parallelism: QKV and FC1 are column-parallel (each rank computes whole heads / a slice of the
MLP width), Proj and FC2 are row-parallel (partial sums all-reduced), so there are two all-reduces per
block forward (and two in backward for the inputs of the column layers). Norms, adaLN and the residual
stream are replicated. Tensors are batch-first ``[B, L, H]``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mcd_scale.config import ModelConfig
from mcd_scale.model.logical import set_logical
from mcd_scale.model.rng_tracker import DATA_PARALLEL_RNG, MODEL_PARALLEL_RNG, DropoutRNG, checkpoint
from mcd_scale.model.tp_layers import ColumnParallel, RowParallel, group_size

try:  # fused norm on GPU clusters when apex is really installed; never required
    from apex.normalization import FusedLayerNorm as _LayerNorm  # type: ignore
except Exception:  # ImportError, or the unrelated PyPI 'apex' package
    _LayerNorm = nn.LayerNorm


def make_norm(dim: int, eps: float, dtype: torch.dtype) -> nn.Module:
    """LayerNorm (apex FusedLayerNorm if importable) with replicated weight=1 / bias=0 init."""
    norm = _LayerNorm(dim, eps=eps)
    norm.to(dtype=dtype)
    set_logical(norm.weight, (dim,), None, "ones")
    set_logical(norm.bias, (dim,), None, "zeros")
    return norm


def replicated_linear(in_features: int, out_features: int, dtype: torch.dtype, init_kind: str) -> nn.Linear:
    """A plain (TP-replicated) linear layer for the small time-conditioning path."""
    lin = nn.Linear(in_features, out_features, dtype=dtype)
    set_logical(lin.weight, (out_features, in_features), None, init_kind)
    set_logical(lin.bias, (out_features,), None, "zeros")
    return lin


def _fork(rng: Optional[DropoutRNG], name: str):
    return rng.fork(name) if rng is not None else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------------
def rotary_cos_sin(seq_len: int, head_dim: int, base: float, device: torch.device,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[seq_len, head_dim]`` in ``dtype`` (float32, or float64 for an fp64 model;
    half-split / GPT-NeoX convention).

    Computed per forward (a few kFLOPs) instead of cached in a buffer: no state to shard, move or
    keep consistent across meta/ZeRO-3 construction.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=dtype), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, L, heads, head_dim]`` by position; math in float32 (float64 for an fp64 x, so
    fp64 reference tests are not rounded to fp32 here), result in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Attention, MLP
# --------------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with a fused column-parallel QKV.

    Logical QKV weight: ``[heads * 3 * head_dim, hidden]`` with rows ordered ``[heads, 3, head_dim]``
    (per-head interleaved q, k, v), so the contiguous TP split of the rows gives each rank whole heads
    with their own q, k and v -- the same logical tensor at any TP size.
    """

    def __init__(self, cfg: ModelConfig, *, tp_group, dtype: torch.dtype, rng: Optional[DropoutRNG]) -> None:
        super().__init__()
        tp = group_size(tp_group)
        self.head_dim = cfg.hidden // cfg.heads
        self.local_heads = cfg.heads // tp
        self.rope_base = cfg.rope_base
        self.dropout = cfg.dropout
        self.rng = rng
        self.qkv = ColumnParallel(cfg.hidden, 3 * cfg.hidden, tp_group=tp_group, dtype=dtype, bias=True)
        self.proj = RowParallel(cfg.hidden, cfg.hidden, tp_group=tp_group, dtype=dtype, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, _ = x.shape
        q, k, v = self.qkv(x).view(b, l, self.local_heads, 3, self.head_dim).unbind(dim=3)
        cos, sin = rotary_cos_sin(l, self.head_dim, self.rope_base, x.device,
                                  torch.promote_types(x.dtype, torch.float32))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        p = self.dropout if self.training else 0.0
        # Attention probabilities are TP-sharded (each rank holds its own heads): per-rank stream.
        with _fork(self.rng, MODEL_PARALLEL_RNG) if p > 0 else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 dropout_p=p, is_causal=False)
        return self.proj(out.transpose(1, 2).reshape(b, l, self.local_heads * self.head_dim))


class MLP(nn.Module):
    """Column-parallel FC1 -> GELU(tanh) -> row-parallel FC2."""

    def __init__(self, cfg: ModelConfig, *, tp_group, dtype: torch.dtype) -> None:
        super().__init__()
        self.fc1 = ColumnParallel(cfg.hidden, cfg.ffn_hidden, tp_group=tp_group, dtype=dtype, bias=True)
        self.fc2 = RowParallel(cfg.ffn_hidden, cfg.hidden, tp_group=tp_group, dtype=dtype, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# --------------------------------------------------------------------------------------------------
# Time conditioning
# --------------------------------------------------------------------------------------------------
class TimeEmbedding(nn.Module):
    """t in [0, 1] -> conditioning vector c = SiLU(MLP(sinusoidal(t))) ``[B, cond_dim]`` (MDLM's
    TimestepEmbedder followed by its SiLU). Replicated across TP ranks."""

    FREQ_DIM = 256

    def __init__(self, cond_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.fc1 = replicated_linear(self.FREQ_DIM, cond_dim, dtype, "normal")
        self.fc2 = replicated_linear(cond_dim, cond_dim, dtype, "normal")

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.FREQ_DIM // 2
        math_dtype = torch.promote_types(self.fc1.weight.dtype, torch.float32)  # fp64 stays fp64
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=math_dtype) / half)
        args = t.to(math_dtype)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.fc1.weight.dtype)
        return F.silu(self.fc2(F.silu(self.fc1(emb))))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


# --------------------------------------------------------------------------------------------------
# Block, final layer
# --------------------------------------------------------------------------------------------------
class TransformerBlock(nn.Module):
    """One pre-norm block (see module docstring). ``forward(x, c)``; ``c`` is None without time
    conditioning. With ``activation_checkpointing`` the block recomputes itself in backward, replaying
    the dropout streams so recomputed masks equal the forward ones."""

    def __init__(self, cfg: ModelConfig, *, tp_group, dtype: torch.dtype, rng: Optional[DropoutRNG],
                 activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.rng = rng
        self.dropout = cfg.dropout
        self.activation_checkpointing = activation_checkpointing
        self.norm1 = make_norm(cfg.hidden, cfg.norm_eps, dtype)
        self.attn = SelfAttention(cfg, tp_group=tp_group, dtype=dtype, rng=rng)
        self.norm2 = make_norm(cfg.hidden, cfg.norm_eps, dtype)
        self.mlp = MLP(cfg, tp_group=tp_group, dtype=dtype)
        # GPT-2 scaled init: the two projections that add into the residual stream get std/sqrt(2L),
        # so the residual's variance at init does not grow with depth.
        for proj in (self.attn.proj.weight, self.mlp.fc2.weight):
            proj.init_std_scale = 1.0 / math.sqrt(2 * cfg.layers)
        # adaLN-Zero: modulation starts at zero, so every block starts as the identity map.
        self.modulation = (replicated_linear(cfg.cond_dim, 6 * cfg.hidden, dtype, "zeros")
                           if cfg.time_conditioning else None)

    def _residual_dropout(self, y: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.dropout > 0):
            return y
        # The residual stream is replicated across TP ranks: the mask must be identical on all of them.
        with _fork(self.rng, DATA_PARALLEL_RNG):
            return F.dropout(y, self.dropout, training=True)

    def _forward(self, x: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
        if self.modulation is None:
            x = x + self._residual_dropout(self.attn(self.norm1(x)))
            return x + self._residual_dropout(self.mlp(self.norm2(x)))
        if c is None:
            raise ValueError("this model is time-conditioned (model.time_conditioning: true): pass t")
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c).chunk(6, dim=-1)
        x = x + gate_a[:, None] * self._residual_dropout(self.attn(_modulate(self.norm1(x), shift_a, scale_a)))
        return x + gate_m[:, None] * self._residual_dropout(self.mlp(_modulate(self.norm2(x), shift_m, scale_m)))

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, c, rng=self.rng)
        return self._forward(x, c)


class FinalNorm(nn.Module):
    """The last LayerNorm (adaLN-modulated when time-conditioned), before the vocabulary head."""

    def __init__(self, cfg: ModelConfig, *, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = make_norm(cfg.hidden, cfg.norm_eps, dtype)
        self.modulation = (replicated_linear(cfg.cond_dim, 2 * cfg.hidden, dtype, "zeros")
                           if cfg.time_conditioning else None)

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.modulation is None:
            return self.norm(x)
        if c is None:
            raise ValueError("this model is time-conditioned (model.time_conditioning: true): pass t")
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return _modulate(self.norm(x), shift, scale)
