"""A masked-diffusion LM exported from mcd_scale: load and sample with

    from transformers import AutoModel, AutoTokenizer
    model = AutoModel.from_pretrained(DIR, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)
    ids = model.sample(num_samples=4, steps=256, sampler="ancestral", temperature=1.0, seed=0)
    print(tok.batch_decode(ids.tolist()))
    logits = model(input_ids, timesteps=t).logits    # [B, L, padded_vocab]: the raw network

Self-contained (torch, numpy and transformers only; never mcd_scale). The network is mcd_scale's
DiffusionTransformer at TP=1: pre-norm bidirectional blocks (rotary attention, GELU-tanh MLP), adaLN-Zero
time conditioning when ``time_conditioning`` is set, output over the padded vocabulary. Parameter names are
mcd_scale's logical names, so ``model.safetensors`` is the same file ``tools/convert_ckpt.py consolidate``
writes. The logits are the raw network output: token ``vocab_size`` is the [MASK] id, and the columns
>= ``vocab_size`` (mask, padding) are never sampled (SUBS).

Samplers (:func:`sample`, ``MCDModel.sample``): a copy of mcd_scale's ``mcd_scale/diffusion/sampling.py``
at export time: the MDLM ancestral sampler and the deterministic coupled sampler (random or strided reveal
order), ``steps`` on the grid ``linspace(1, 1e-5, steps + 1)``, each revealed token drawn by inverse CDF in
float64 at temperature T from one uniform per (sample, position), every random draw keyed by (purpose, seed,
sample index[, position]) exactly as mcd_scale keys it. On the same device and weights they return mcd_scale's
tokens for the same seed, token for token (up to a uniform within float64 rounding of a CDF boundary); a sample
does not depend on the batch size.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
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
                 norm_eps: float = 1e-5, schedule: str = "loglinear", schedule_eps: float = 1e-3,
                 sampling: Optional[dict] = None, **kwargs):
        self.vocab_size, self.padded_vocab, self.seq_len = vocab_size, padded_vocab, seq_len
        self.hidden, self.layers, self.heads, self.ffn_hidden = hidden, layers, heads, ffn_hidden
        self.time_conditioning, self.cond_dim, self.tie_embeddings = time_conditioning, cond_dim, tie_embeddings
        self.rope_base, self.norm_eps = rope_base, norm_eps
        self.mask_id = vocab_size
        self.schedule, self.schedule_eps = schedule, schedule_eps  # alpha_t of the diffusion the model learnt
        self.sampling = dict(sampling or {})  # the exporter's recommended sampler, steps and temperature
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

    @torch.no_grad()
    def sample(self, num_samples: int = 1, steps: Optional[int] = None, sampler: Optional[str] = None,
               temperature: Optional[float] = None, seed: int = 0, reveal_order: str = "random",
               stride: Optional[int] = None, batch_size: Optional[int] = None, greedy_tail: bool = True,
               seq_len: Optional[int] = None) -> torch.Tensor:
        """``num_samples`` sequences of token ids [num_samples, seq_len] (LongTensor on the host, all ids
        < vocab_size). Defaults (``steps``, ``sampler``, ``temperature``) come from ``config.sampling``; the
        network runs on this model's device. See :func:`sample` for the samplers and the keying rule."""
        rec = self.config.sampling
        steps = int(steps if steps is not None else rec.get("steps", 256))
        sampler = sampler or rec.get("sampler", "ancestral")
        temperature = float(temperature if temperature is not None else rec.get("temperature", 1.0))
        device = next(self.parameters()).device

        def denoiser(z, t):
            return self(z, timesteps=t.to(device)).logits.float()

        return sample(denoiser, num_samples, seq_len or self.config.seq_len, steps, self.config.vocab_size,
                      self.config.schedule, self.config.schedule_eps, seed, sampler=sampler,
                      temperature=temperature, reveal_order=reveal_order, stride=stride, batch_size=batch_size,
                      greedy_tail=greedy_tail, device=device)


# --------------------------------------------------------------------------------------------------
# Samplers: a copy of mcd_scale/diffusion/sampling.py and mcd_scale/rng.py (the keys must stay identical)
T_END = 1e-5
_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def key_to_seed(purpose: str, *ids: int) -> int:
    """A 63-bit seed from a purpose string and integer ids (blake2b; stable across runs and platforms)."""
    text = purpose + ":" + ",".join(str(int(i)) for i in ids)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_generator(purpose: str, *ids: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(key_to_seed(purpose, *ids))
    return gen


def schedule_alpha(name: str, eps: float, t: torch.Tensor) -> torch.Tensor:
    """alpha_t: 'loglinear' 1 - (1 - eps) t, or 'cosine' eps + (1 - eps) cos(pi t / 2)."""
    if name == "loglinear":
        return 1.0 - (1.0 - eps) * t
    if name == "cosine":
        return eps + (1.0 - eps) * torch.cos(0.5 * math.pi * t)
    raise ValueError(f"unknown schedule {name!r}")


def sampling_times(steps: int) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, T_END, steps + 1, dtype=torch.float64)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def token_uniforms(seed: int, sample_index: int, positions, purpose: str) -> torch.Tensor:
    """Uniform(0, 1) numbers [len(positions)] (float64), one per token, keyed by (purpose, seed, sample,
    position): the SplitMix64 stream of the sample's key read at index ``position``."""
    key = np.uint64(key_to_seed(purpose, seed, sample_index))
    counter = np.asarray(positions, dtype=np.uint64).reshape(-1) + np.uint64(1)
    with np.errstate(over="ignore"):
        bits = _splitmix64(key + counter * _GAMMA)
    return torch.from_numpy(((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0))


def inverse_cdf_draw(log_probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``log_probs`` [R, V] (float64) from its uniform ``u`` [R]: the smallest k with
    u * total < cdf[k] (exact inverse-CDF sampling; runs where ``log_probs`` lives)."""
    cdf = torch.cumsum(torch.exp(log_probs - log_probs.amax(dim=-1, keepdim=True)), dim=-1)
    x = (u.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_(max=log_probs.shape[-1] - 1)


def reveal_thresholds(order: str, seed: int, sample_index: int, seq_len: int, schedule: str, eps: float,
                      stride: int) -> torch.Tensor:
    """The coupled sampler's per-token thresholds u [L]: a token is masked at t iff u >= alpha_t."""
    if order == "random":
        return torch.rand(seq_len, generator=keyed_generator("coupled-sample", seed, sample_index),
                          dtype=torch.float64)
    if order != "strided":
        raise ValueError(f"reveal order must be 'random' or 'strided', got {order!r}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    gen = keyed_generator("coupled-sample-strided", seed, sample_index)
    band = torch.randperm(stride, generator=gen)[torch.arange(seq_len) % stride]
    grid = schedule_alpha(schedule, eps, sampling_times(stride))
    lo, hi = grid[band], grid[band + 1]
    return lo + torch.rand(seq_len, generator=gen, dtype=torch.float64) * (hi - lo)


def _fill(z, reveal, logits, ids, seed, vocab_size, temperature, purpose, greedy) -> None:
    """Set every position in ``reveal`` to a draw from softmax(log p / T) (argmax when ``greedy``), in place."""
    rows, pos = reveal.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return
    dev = logits.device
    score = torch.log_softmax(logits[rows.to(dev), pos.to(dev)][..., :vocab_size].double() / temperature, dim=-1)
    if greedy:
        chosen = score.argmax(-1)
    else:
        u = torch.empty(rows.numel(), dtype=torch.float64)
        for b in range(len(ids)):
            sel = rows == b
            if bool(sel.any()):
                u[sel] = token_uniforms(seed, ids[b], pos[sel].numpy(), purpose)
        chosen = inverse_cdf_draw(score, u.to(dev))
    z[rows, pos] = chosen.cpu().to(z.dtype)


def sample(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], num_samples: int, seq_len: int,
           steps: int, vocab_size: int, schedule: str = "loglinear", eps: float = 1e-3, seed: int = 0,
           sampler: str = "ancestral", temperature: float = 1.0, reveal_order: str = "random",
           stride: Optional[int] = None, batch_size: Optional[int] = None, greedy_tail: bool = True,
           device=None) -> torch.Tensor:
    """Unconditional samples [num_samples, seq_len] from ``denoiser(z [B, L], t [B]) -> logits [B, L, >= V+1]``.

    ``ancestral`` (MDLM): at t -> s each masked token is revealed with probability (alpha_s - alpha_t) /
    (1 - alpha_t), its value drawn from softmax(logits / T) by inverse CDF (float64) from one keyed uniform per
    token. ``coupled``: per-token thresholds and value uniforms drawn once; at t -> s exactly the tokens with
    alpha_t <= u < alpha_s are revealed, each drawn the same way; ``reveal_order`` 'strided' puts positions j = j' (mod stride) in
    separate bands (stride default min(steps, seq_len)). The network is called only on samples with a token
    to reveal. Masks left after the last step are filled greedily (``greedy_tail``) or sampled."""
    if sampler not in ("ancestral", "coupled"):
        raise ValueError(f"sampler must be 'ancestral' or 'coupled', got {sampler!r}")
    if sampler == "ancestral" and (reveal_order != "random" or stride is not None):
        raise ValueError("reveal_order/stride apply to the coupled sampler")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = torch.device(device or "cpu")
    stride = min(steps, seq_len) if stride is None else stride
    times = sampling_times(steps)
    alphas = schedule_alpha(schedule, eps, times)
    batch_size = batch_size or num_samples
    mask_id = vocab_size
    purpose = sampler + "-token"

    def logits_of(sub, t):
        t_vec = torch.full((sub.shape[0],), t, dtype=torch.float32, device=device)
        with torch.no_grad():
            out = denoiser(sub.to(device), t_vec)
        if out.shape[:2] != sub.shape or out.shape[-1] < vocab_size + 1:
            raise ValueError(f"denoiser returned {tuple(out.shape)}; expected [B, L, >= V+1 = {vocab_size + 1}]")
        return out

    out = []
    for lo in range(0, num_samples, batch_size):
        ids = list(range(lo, min(lo + batch_size, num_samples)))
        z = torch.full((len(ids), seq_len), mask_id, dtype=torch.long)
        if sampler == "coupled":
            u = torch.stack([reveal_thresholds(reveal_order, seed, i, seq_len, schedule, eps, stride) for i in ids])
        else:
            gens = [keyed_generator("ancestral", seed, i) for i in ids]
        for k in range(steps):
            a_t, a_s = float(alphas[k]), float(alphas[k + 1])
            masked = z == mask_id
            if sampler == "coupled":
                reveal = masked & (u < a_s)
            else:
                draws = torch.stack([torch.rand(seq_len, generator=g, dtype=torch.float64) for g in gens])
                reveal = masked & (draws < (a_s - a_t) / (1.0 - a_t))
            rows = reveal.any(dim=1).nonzero().flatten()
            if rows.numel() > 0:
                sub = z[rows]
                _fill(sub, reveal[rows], logits_of(sub, float(times[k])), [ids[int(r)] for r in rows], seed,
                      vocab_size, temperature, purpose, greedy=False)
                z[rows] = sub
        remaining = z == mask_id
        rows = remaining.any(dim=1).nonzero().flatten()
        if rows.numel() > 0:
            sub = z[rows]
            _fill(sub, remaining[rows], logits_of(sub, float(times[-1])), [ids[int(r)] for r in rows], seed,
                  vocab_size, temperature, purpose, greedy=greedy_tail)
            z[rows] = sub
        out.append(z)
    return torch.cat(out)
