"""A masked-diffusion LM exported from mcd_scale: load with

    from transformers import AutoModel
    model = AutoModel.from_pretrained(DIR, trust_remote_code=True)
    logits = model(input_ids, timesteps=t).logits    # [B, L, padded_vocab]

Self-contained (torch + transformers only). The network is mcd_scale's DiffusionTransformer at TP=1:
pre-norm bidirectional blocks (rotary attention, GELU-tanh MLP), adaLN-Zero time conditioning when
``time_conditioning`` is set, output over the padded vocabulary. Parameter names are mcd_scale's logical
names, so ``model.safetensors`` is the same file ``tools/convert_ckpt.py consolidate`` writes.

The logits are the raw network output: the columns >= ``vocab_size + 1`` are padding and the sampler
(``tools/sample.py``; SUBS parameterisation) sets them, and the mask id ``vocab_size``, to -inf. Token
``vocab_size`` is the [MASK] id. See sampling_config.json for how this model is meant to be sampled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


class MCDConfig(PretrainedConfig):
    model_type = "mcd_mdlm"

    def __init__(self, vocab_size: int = 4096, padded_vocab: int = 4224, seq_len: int = 128, hidden: int = 256,
                 layers: int = 4, heads: int = 4, ffn_hidden: int = 1024, time_conditioning: bool = False,
                 cond_dim: int = 128, tie_embeddings: bool = False, rope_base: float = 10000.0,
                 norm_eps: float = 1e-5, **kwargs):
        self.vocab_size, self.padded_vocab, self.seq_len = vocab_size, padded_vocab, seq_len
        self.hidden, self.layers, self.heads, self.ffn_hidden = hidden, layers, heads, ffn_hidden
        self.time_conditioning, self.cond_dim, self.tie_embeddings = time_conditioning, cond_dim, tie_embeddings
        self.rope_base, self.norm_eps = rope_base, norm_eps
        self.mask_id = vocab_size
        kwargs["tie_word_embeddings"] = False  # our own tying (the head reads embed.weight); no HF tying
        super().__init__(**kwargs)


@dataclass
class MCDOutput(ModelOutput):
    logits: Optional[torch.Tensor] = None


def _rotary(seq_len: int, head_dim: int, base: float, device, dtype):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=dtype), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _apply_rotary(x, cos, sin):
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf.chunk(2, dim=-1)
    out = xf * cos[None, :, None, :] + torch.cat([-x2, x1], dim=-1) * sin[None, :, None, :]
    return out.to(x.dtype)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, c: MCDConfig):
        super().__init__()
        self.heads, self.head_dim, self.base = c.heads, c.hidden // c.heads, c.rope_base
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden)  # rows ordered [heads, 3, head_dim]
        self.proj = nn.Linear(c.hidden, c.hidden)

    def forward(self, x):
        b, l, _ = x.shape
        q, k, v = self.qkv(x).view(b, l, self.heads, 3, self.head_dim).unbind(dim=3)
        cos, sin = _rotary(l, self.head_dim, self.base, x.device, torch.promote_types(x.dtype, torch.float32))
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=False)
        return self.proj(out.transpose(1, 2).reshape(b, l, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, c: MCDConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c.hidden, c.ffn_hidden), nn.Linear(c.ffn_hidden, c.hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, c: MCDConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c.hidden, eps=c.norm_eps), nn.LayerNorm(c.hidden, eps=c.norm_eps)
        self.attn, self.mlp = Attention(c), MLP(c)
        self.modulation = nn.Linear(c.cond_dim, 6 * c.hidden) if c.time_conditioning else None

    def forward(self, x, cond):
        if self.modulation is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        sa, ca, ga, sm, cm, gm = self.modulation(cond).chunk(6, dim=-1)
        x = x + ga[:, None] * self.attn(_modulate(self.norm1(x), sa, ca))
        return x + gm[:, None] * self.mlp(_modulate(self.norm2(x), sm, cm))


class TimeEmbedding(nn.Module):
    FREQ_DIM = 256

    def __init__(self, c: MCDConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(self.FREQ_DIM, c.cond_dim), nn.Linear(c.cond_dim, c.cond_dim)

    def forward(self, t):
        half = self.FREQ_DIM // 2
        math_dtype = torch.promote_types(self.fc1.weight.dtype, torch.float32)
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=math_dtype) / half)
        args = t.to(math_dtype)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.fc1.weight.dtype)
        return F.silu(self.fc2(F.silu(self.fc1(emb))))


class FinalNorm(nn.Module):
    def __init__(self, c: MCDConfig):
        super().__init__()
        self.norm = nn.LayerNorm(c.hidden, eps=c.norm_eps)
        self.modulation = nn.Linear(c.cond_dim, 2 * c.hidden) if c.time_conditioning else None

    def forward(self, x, cond):
        if self.modulation is None:
            return self.norm(x)
        shift, scale = self.modulation(cond).chunk(2, dim=-1)
        return _modulate(self.norm(x), shift, scale)


class MCDModel(PreTrainedModel):
    config_class = MCDConfig
    base_model_prefix = "mcd"
    main_input_name = "input_ids"

    def __init__(self, config: MCDConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.padded_vocab, config.hidden)
        self.time = TimeEmbedding(config) if config.time_conditioning else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.final = FinalNorm(config)
        self.head = None if config.tie_embeddings else nn.Linear(config.hidden, config.padded_vocab, bias=False)
        self.post_init()

    def _init_weights(self, module):  # every weight comes from model.safetensors
        pass

    def forward(self, input_ids: torch.Tensor, timesteps: Optional[torch.Tensor] = None, **_unused) -> MCDOutput:
        """input_ids [B, L] (mask id = vocab_size); timesteps [B] in [0, 1] (time-conditioned models only)."""
        h = self.embed(input_ids)
        cond = None
        if self.time is not None:
            if timesteps is None:
                raise ValueError("this model is time-conditioned: pass timesteps [B]")
            cond = self.time(timesteps)
        for block in self.blocks:
            h = block(h, cond)
        h = self.final(h, cond)
        logits = F.linear(h, self.embed.weight) if self.head is None else self.head(h)
        return MCDOutput(logits=logits)
