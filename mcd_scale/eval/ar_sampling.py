"""Left-to-right sampling from the project's causal LM (:class:`mcd_scale.eval.ar_evaluator.CausalLM`) with a
KV cache: the autoregressive speed reference of ``tools/bench/sampling.py``.

One network call per token, each on one new position: the keys and values of earlier positions are kept per
block ([B, heads, L, head_dim], preallocated on the model's device), so a call costs O(position) attention and
O(1) everything else, as a served AR model does. The categorical draws are Gumbel-max with noise from a
keyed host generator (as the diffusion samplers draw on the host), so the same key gives the same tokens on
any device; only the chosen ids cross back.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mcd_scale.eval.ar_evaluator import CausalLM
from mcd_scale.rng import keyed_generator


@torch.no_grad()
def generate(model: CausalLM, num_samples: int, length: int, seed: int, temperature: float = 1.0,
             return_logits: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(ids [num_samples, length] on the host, the logits of every call [num_samples, length, V] or None).

    ``logits[:, l]`` is what ``model(ids)[:, l]`` computes in one full causal forward over the sampled ids
    (tests/test_eval_ar_sampling.py checks the cache against it)."""
    cfg = model.cfg
    if not 1 <= length <= cfg.max_len:
        raise ValueError(f"length {length} must be in [1, max_len = {cfg.max_len}]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B, H, nh, V = num_samples, cfg.hidden, cfg.heads, cfg.vocab_size
    hd = H // nh
    cache = [(torch.empty(B, nh, length, hd, device=dev, dtype=dtype),
              torch.empty(B, nh, length, hd, device=dev, dtype=dtype)) for _ in model.blocks]
    gen = keyed_generator("ar-sample", seed)
    ids = torch.empty(B, length, dtype=torch.long, device="cpu")
    all_logits = torch.empty(B, length, V, dtype=torch.float32, device="cpu") if return_logits else None
    tok = torch.full((B,), V, dtype=torch.long, device=dev)  # BOS
    for pos in range(length):
        x = (model.tok(tok) + model.pos.weight[pos]).unsqueeze(1)  # [B, 1, H]
        for block, (k_cache, v_cache) in zip(model.blocks, cache):
            q, k, v = block.qkv(block.norm1(x)).view(B, 1, 3, nh, hd).unbind(2)
            k_cache[:, :, pos] = k[:, 0]
            v_cache[:, :, pos] = v[:, 0]
            # the new position attends to every cached one (all earlier): no mask needed
            att = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1])
            x = x + block.proj(att.transpose(1, 2).reshape(B, 1, H))
            x = x + block.mlp(block.norm2(x))
        logits = model.head(model.norm(x[:, 0])).float().cpu()
        if all_logits is not None:
            all_logits[:, pos] = logits
        u = torch.rand(B, V, generator=gen, dtype=torch.float32, device="cpu").clamp_(1e-20, 1.0)
        nxt = (logits / temperature - torch.log(-torch.log(u))).argmax(-1)
        ids[:, pos] = nxt
        tok = nxt.to(dev)
    return ids, all_logits
