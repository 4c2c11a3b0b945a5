"""A small independent autoregressive evaluator for Gen PPL on text (docs/method.md §8, small scale).

GPT-2 Large is the literature's evaluator; none ships in a reachable registry, so at small scale we train a
causal transformer on the *held-out* split (never seen by the diffusion models), with the same tokenizer,
and score generated ids with it. It is independent of the diffusion model (different objective,
architecture and data), which is what keeps "lower Gen PPL" from being self-grading.

Plain torch, single process, deterministic: initialisation and batches come from keyed generators.
Weights are saved as safetensors + a JSON config (no pickle).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mcd_scale.rng import keyed_generator

CONFIG_NAME = "ar_evaluator.json"
WEIGHTS_NAME = "ar_evaluator.safetensors"


@dataclass(frozen=True)
class ARConfig:
    """Shape of the evaluator. Token id ``vocab_size`` is its BOS, so every one of the L tokens is scored."""
    vocab_size: int
    max_len: int
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    ffn: int = 512


class _Block(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.hidden)
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.norm2 = nn.LayerNorm(cfg.hidden)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden, cfg.ffn), nn.GELU(), nn.Linear(cfg.ffn, cfg.hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, H = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, H // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, L, H))
        return x + self.mlp(self.norm2(x))


class CausalLM(nn.Module):
    """Pre-LN causal transformer with learned positions; forward returns next-token logits for all L ids."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        if cfg.hidden % cfg.heads:
            raise ValueError(f"hidden {cfg.hidden} must be divisible by heads {cfg.heads}")
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size + 1, cfg.hidden)
        self.pos = nn.Embedding(cfg.max_len, cfg.hidden)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """logits[:, l] predicts ids[:, l] from ids[:, :l] (a BOS stands in front of the sequence)."""
        B, L = ids.shape
        bos = torch.full((B, 1), self.cfg.vocab_size, dtype=ids.dtype, device=ids.device)
        inp = torch.cat([bos, ids[:, :-1]], 1)
        x = self.tok(inp) + self.pos(torch.arange(L, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _init_weights(model: nn.Module, seed: int) -> None:
    """Keyed initialisation (the global RNG would make the evaluator depend on what ran before)."""
    gen = keyed_generator("ar-evaluator.init", seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=gen)
            elif name.endswith("weight"):   # LayerNorm gains
                p.fill_(1.0)
            else:
                p.zero_()


class AREvaluator:
    """A trained :class:`CausalLM` with scoring helpers (eval mode, no grad)."""

    def __init__(self, model: CausalLM):
        self.model = model.eval()
        self.config = model.cfg

    def _check(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() != 2 or ids.shape[1] < 1:
            raise ValueError(f"ids must be [N, L], got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.config.max_len:
            raise ValueError(f"sequences of {ids.shape[1]} tokens exceed the evaluator's max_len "
                             f"{self.config.max_len}; train it with a longer seq_len")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"ids outside [0, {self.config.vocab_size}) (mask ids left unfilled?)")
        return ids

    @torch.no_grad()
    def score(self, ids: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """Per-sequence NLL per token (nats), float64 [N]; every token is scored (BOS-conditioned)."""
        ids = self._check(ids)
        out = []
        device = next(self.model.parameters()).device  # the evaluator runs where its weights live
        for i in range(0, ids.shape[0], batch_size):
            chunk = ids[i:i + batch_size].to(device)
            logits = self.model(chunk).double()
            nll = F.cross_entropy(logits.transpose(1, 2), chunk, reduction="none")
            out.append(nll.mean(1))
        return torch.cat(out).cpu().numpy() if out else np.zeros(0)

    def gen_ppl(self, ids: torch.Tensor) -> float:
        """exp of the token-weighted mean NLL (all sequences have the same length here)."""
        return math.exp(float(self.score(ids).mean()))

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME))
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump({"format": "mcd_scale.ar_evaluator", "version": 1, **asdict(self.config)}, f, indent=2)

    @classmethod
    def load(cls, directory: str) -> "AREvaluator":
        cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        for path in (cfg_path, w_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: '{directory}' is not an AR evaluator directory "
                                        "(train one with tools/evaluate.py --train-ar-evaluator)")
        with open(cfg_path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.pop("format", None) != "mcd_scale.ar_evaluator" or doc.pop("version", None) != 1:
            raise ValueError(f"{cfg_path} is not an mcd_scale.ar_evaluator v1 config")
        model = CausalLM(ARConfig(**doc))
        model.load_state_dict(load_file(w_path))
        return cls(model)


def train_ar_evaluator(ids: torch.Tensor, vocab_size: int, steps: int, seed: int, *, hidden: int = 128,
                       layers: int = 2, heads: int = 4, ffn: int | None = None, batch_size: int = 16,
                       lr: float = 3e-3, warmup: int = 20, log_every: int = 0,
                       device: torch.device | str = "cpu") -> AREvaluator:
    """Train a causal LM on ``ids`` [N, L] (the held-out split) for ``steps`` AdamW steps.

    Batches are drawn with replacement from ``keyed_generator("ar-evaluator.batch", seed, step)``;
    learning rate: linear warmup then cosine to 10%. Returns the evaluator in eval mode, on ``device``
    (the batch rows are drawn on the host, so the draws are the same on any device).
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 2 or ids.shape[0] == 0:
        raise ValueError(f"training ids must be a non-empty [N, L] tensor, got shape {tuple(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"training ids outside [0, {vocab_size})")
    cfg = ARConfig(vocab_size, ids.shape[1], hidden, layers, heads, ffn or 4 * hidden)
    model = CausalLM(cfg)
    _init_weights(model, seed)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    for step in range(steps):
        scale = min(1.0, (step + 1) / max(warmup, 1))
        scale *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        rows = torch.randint(0, ids.shape[0], (batch_size,), generator=keyed_generator("ar-evaluator.batch", seed, step))
        batch = ids[rows].to(device, non_blocking=True)
        loss = F.cross_entropy(model(batch).transpose(1, 2), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"ar-evaluator step {step}: loss {loss.item():.4f}", flush=True)
    return AREvaluator(model)
