"""Unconditional samplers for masked diffusion (docs/method.md §7): ancestral and deterministic coupled.

Network interface: ``denoiser(z: LongTensor[B, L], t: Tensor[B]) -> logits [B, L, >= V+1]`` on the full
vocabulary; columns >= V (mask, padding) are ignored (SUBS), probabilities are float64.

Both samplers walk ``t_0 = 1 > t_1 > ... > t_N = 1e-5`` (``linspace``). Which tokens a step reveals
never depends on the network, so the network is called only on steps that reveal something (lazy
evaluation). For a time-agnostic model this is exactly MDLM's cache (its output can only change when z
does, and z changes only through reveals, so every cache miss is such a step); for a time-conditioned
model it skips only evaluations whose output no token would use. Either way the law is unchanged.
The skip is per sample: a step runs the network only on the rows that reveal something, and ``nfe`` is
the mean number of rows each sample sent through it (<= steps + 1, far fewer when steps >> L), the
same whatever the batch size. Randomness is keyed per (seed, sample index[, position]), so sample i is the same whatever the
batch size, and each token's value uniform is drawn once (the same for every step count).

A revealed token's value is drawn by inverse CDF from one keyed uniform per (sample, position)
(:func:`token_uniforms`, :func:`inverse_cdf_draw`): the host draws O(positions) numbers, the device does
the O(positions x V) work (softmax, running sum, binary search) next to the logits. CPU and GPU give the
same tokens except when a uniform falls within float64 rounding of a CDF boundary (the two devices may
sum the V probabilities in a different order), which for V = 50,257 is a ~1e-11 chance per token
(estimate: V x 2^-52 relative error of the running sum).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from mcd_scale.diffusion.schedules import Schedule
from mcd_scale.rng import key_to_seed, keyed_generator

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
T_END = 1e-5


@dataclass
class SampleResult:
    tokens: torch.Tensor  # LongTensor [num_samples, seq_len], all in [0, V)
    nfe: float  # network evaluations per sample (mean over samples)
    seconds: float  # wall-clock for the whole call


def sampling_times(steps: int) -> torch.Tensor:
    """linspace(1, 1e-5, steps + 1) in float64."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, T_END, steps + 1, dtype=torch.float64)


_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def token_gumbel_rows(seed: int, sample_index: int, positions, vocab_size: int, purpose: str) -> torch.Tensor:
    """Gumbel(0,1) noise [len(positions), V] (float64), keyed by (purpose, seed, sample, position, token).

    Not used by the samplers any more (they draw one uniform per token, :func:`token_uniforms`: this
    function's host work is proportional to positions x V); kept for the experiments that couple
    their own Gumbel-max draws.

    Counter-based (the SplitMix64 stream of the sample's key, read at index position * V + token): the
    noise of a token is the same whatever the step count, batch size or the order tokens are revealed
    in, and drawing it costs a few vector ops instead of seeding a generator per token (measured here:
    ~3.6 us per token for V = 64 against ~69 us with a torch.Generator per token)."""
    key = np.uint64(key_to_seed(purpose, seed, sample_index))
    pos = np.asarray(positions, dtype=np.uint64).reshape(-1, 1)
    counter = pos * np.uint64(vocab_size) + np.arange(vocab_size, dtype=np.uint64).reshape(1, -1) + np.uint64(1)
    with np.errstate(over="ignore"):
        bits = _splitmix64(key + counter * _GAMMA)
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)  # (0, 1), 53 bits
    return torch.from_numpy(-np.log(-np.log(u)))


REVEAL_ORDERS = ("random", "strided")


def reveal_thresholds(order: str, seed: int, sample_index: int, seq_len: int, schedule: Schedule,
                      stride: int) -> torch.Tensor:
    """The coupled sampler's per-token thresholds u [L] (float64): a token is masked at t iff u >= alpha_t.

    ``random``: i.i.d. Uniform(0, 1) (docs/method.md §4), tokens revealed in one step are scattered at random.
    ``strided``: positions j and j' = j (mod stride) share a band of the ``stride``-step grid: residue class
    c gets u uniform in [alpha_{sigma(c)}, alpha_{sigma(c)+1}) of ``alpha(linspace(1, 1e-5, stride + 1))``,
    with sigma a random permutation of the classes (keyed per sample). Each token's reveal time keeps the
    same marginal law over the grid's range, but tokens closer than ``stride`` never fall in one band, so at
    ``steps == stride`` a step reveals exactly one residue class, and no two tokens drawn independently in
    one step are neighbours. Why: on the exact benchmark the few-step gap is made of neighbours revealed in
    the same step (docs/log.md, "Reveal order")."""
    if order == "random":
        return torch.rand(seq_len, generator=keyed_generator("coupled-sample", seed, sample_index),
                          dtype=torch.float64)
    if order != "strided":
        raise ValueError(f"reveal order must be one of {REVEAL_ORDERS}, got '{order}'")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    gen = keyed_generator("coupled-sample-strided", seed, sample_index)
    band = torch.randperm(stride, generator=gen)[torch.arange(seq_len) % stride]
    grid = schedule.alpha(sampling_times(stride))
    lo, hi = grid[band], grid[band + 1]
    return lo + torch.rand(seq_len, generator=gen, dtype=torch.float64) * (hi - lo)


def token_gumbel(seed: int, sample_index: int, position: int, vocab_size: int, purpose: str) -> torch.Tensor:
    """Gumbel(0,1) noise [V] (float64) for one token, keyed by (seed, sample, position)."""
    return token_gumbel_rows(seed, sample_index, [position], vocab_size, purpose)[0]


class _CountingDenoiser:
    """Calls the network, checks its output shape and counts the calls (the NFE)."""

    def __init__(self, denoiser: Denoiser, vocab_size: int):
        self.denoiser, self.vocab_size = denoiser, vocab_size
        self.calls = 0

    def logits(self, z: torch.Tensor, t: float) -> torch.Tensor:
        """The network on the rows of ``z``; each row counts as one function evaluation."""
        t_vec = torch.full((z.shape[0],), t, dtype=torch.float32, device=z.device)
        with torch.no_grad():
            out = self.denoiser(z, t_vec)
        if out.shape[:2] != z.shape or out.shape[-1] < self.vocab_size + 1:
            raise ValueError(f"denoiser returned {tuple(out.shape)}; expected [B={z.shape[0]}, "
                             f"L={z.shape[1]}, >= V+1={self.vocab_size + 1}]")
        self.calls += z.shape[0]
        return out


def _log_probs(logits_rows: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """SUBS on masked rows: log-softmax over the V real tokens of logits / T, float64."""
    return torch.log_softmax(logits_rows[..., :vocab_size].double() / temperature, dim=-1)


def token_uniforms(seed: int, sample_index: int, positions, purpose: str) -> torch.Tensor:
    """Uniform(0, 1) numbers [len(positions)] (float64), one per token, keyed by (purpose, seed, sample,
    position): the SplitMix64 stream of the sample's key read at index ``position`` (53-bit mantissa, never
    0 or 1). The same whatever the step count, batch size or the order tokens are revealed in; the cost is
    a few vector ops per position, independent of the vocabulary size."""
    key = np.uint64(key_to_seed(purpose, seed, sample_index))
    counter = np.asarray(positions, dtype=np.uint64).reshape(-1) + np.uint64(1)
    with np.errstate(over="ignore"):
        bits = _splitmix64(key + counter * _GAMMA)
    return torch.from_numpy(((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0))


def inverse_cdf_draw(log_probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``log_probs`` [R, V] (float64, normalised or not) from its uniform ``u`` [R]:
    the smallest k with u * total < cdf[k], where cdf is the running sum of exp(log_probs). Exact
    inverse-CDF sampling of the row's categorical law; a token of probability 0 is never chosen (its cdf
    step is empty). Runs where ``log_probs`` lives: O(R x V) device work, O(R) host-to-device bytes."""
    cdf = torch.cumsum(torch.exp(log_probs - log_probs.amax(dim=-1, keepdim=True)), dim=-1)
    x = (u.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_(max=log_probs.shape[-1] - 1)


def _fill(z: torch.Tensor, reveal: torch.Tensor, logits: torch.Tensor, ids: list[int], seed: int,
          vocab_size: int, temperature: float, purpose: str, greedy: bool) -> None:
    """Set every position in ``reveal`` to a draw from softmax(log p / T) (or argmax log p when greedy),
    in place.

    ``z`` and ``reveal`` live on the host (small [B, L] bookkeeping); ``logits`` on the network's device.
    The revealed rows are gathered and drawn on that device by inverse CDF (:func:`inverse_cdf_draw`)
    from one keyed uniform per token (:func:`token_uniforms`, drawn on the host from the counter stream,
    so they are the same on any device): one host-to-device copy of the indices and uniforms and one
    device-to-host copy of the chosen ids per call, nothing proportional to the vocabulary on the host."""
    rows, pos = reveal.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return
    dev = logits.device
    score = _log_probs(logits[rows.to(dev), pos.to(dev)], vocab_size, temperature)
    if greedy:
        chosen = score.argmax(-1)
    else:
        # On the host on purpose: the keyed uniforms come from numpy generators keyed by (purpose, sample id, seed),
        # one per revealed token (never positions x V), and cross to the device in one copy below.
        u = torch.empty(rows.numel(), dtype=torch.float64)
        for b in range(len(ids)):
            sel = rows == b
            if bool(sel.any()):
                u[sel] = token_uniforms(seed, ids[b], pos[sel].numpy(), purpose)
        chosen = inverse_cdf_draw(score, u.to(dev, non_blocking=True))
    z[rows, pos] = chosen.cpu().to(z.dtype)


def _run(mode: str, denoiser: Denoiser, num_samples: int, seq_len: int, steps: int, vocab_size: int,
         schedule: Schedule, seed: int, temperature: float, batch_size: Optional[int], greedy_tail: bool,
         progress: bool, reveal_order: str = "random", stride: Optional[int] = None,
         device: Optional[torch.device | str] = None, greedy_last_step: bool = False,
         first_sample: int = 0) -> SampleResult:
    """The network runs on ``device`` (default: the host). Every random draw (thresholds, ancestral
    reveal draws, token uniforms) comes from keyed CPU generators / the counter stream on the host, and the
    [B, L] token state stays there; only the network's input rows go to the device and only the chosen
    ids come back, once per step. Same key -> same tokens on any device, up to float64 ties in argmax."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # A torch.device is kept as given (the same object: the CPU device sanitizer recognises its stand-in device so).
    device = device if isinstance(device, torch.device) else torch.device(device or "cpu")
    stride = min(steps, seq_len) if stride is None else stride
    times = sampling_times(steps)
    alphas = schedule.alpha(times)
    batch_size = batch_size or num_samples
    mask_id = vocab_size
    start = time.perf_counter()
    out, total_calls = [], 0
    for lo in range(0, num_samples, batch_size):
        ids = list(range(first_sample + lo, first_sample + min(lo + batch_size, num_samples)))
        z = torch.full((len(ids), seq_len), mask_id, dtype=torch.long)
        net = _CountingDenoiser(denoiser, vocab_size)
        if mode == "coupled":
            u = torch.stack([reveal_thresholds(reveal_order, seed, i, seq_len, schedule, stride) for i in ids])
        else:
            gens = [keyed_generator("ancestral", seed, i) for i in ids]
        for k in range(steps):
            a_t, a_s = float(alphas[k]), float(alphas[k + 1])
            masked = z == mask_id
            if mode == "coupled":
                # Masked tokens are exactly those with u >= alpha_t (all of them at t = 1).
                reveal = masked & (u < a_s)
            else:
                draws = torch.stack([torch.rand(seq_len, generator=g, dtype=torch.float64) for g in gens])
                reveal = masked & (draws < (a_s - a_t) / (1.0 - a_t))
            rows = reveal.any(dim=1).nonzero().flatten()
            if rows.numel() > 0:
                # Only the samples with a token to reveal call the network: the others' outputs would
                # be unchanged (time-agnostic caching), so NFE is counted per sample, as docs/method.md §7 asks.
                sub = z[rows]
                logits = net.logits(sub.to(device, non_blocking=True), float(times[k]))
                # greedy_last_step: the final step t_{N-1} -> t_N argmaxes its reveals (docs/method.md section 7);
                # the uniforms of those tokens are simply not used, so earlier steps are unchanged.
                _fill(sub, reveal[rows], logits, [ids[int(r)] for r in rows], seed, vocab_size, temperature,
                      mode + "-token", greedy=greedy_last_step and k == steps - 1)
                z[rows] = sub
            if progress and (k + 1) % max(1, steps // 10) == 0:
                print(f"[{mode}] samples {ids[0]}-{ids[-1]}: step {k + 1}/{steps}, nfe {net.calls}",
                      file=sys.stderr, flush=True)
        remaining = z == mask_id
        rows = remaining.any(dim=1).nonzero().flatten()
        if rows.numel() > 0:  # tail: whatever the last step left masked
            sub = z[rows]
            logits = net.logits(sub.to(device, non_blocking=True), float(times[-1]))
            _fill(sub, remaining[rows], logits, [ids[int(r)] for r in rows], seed, vocab_size, temperature,
                  mode + "-token", greedy=greedy_tail)
            z[rows] = sub
        out.append(z)
        total_calls += net.calls
    return SampleResult(torch.cat(out), total_calls / num_samples, time.perf_counter() - start)


def ancestral_sample(denoiser: Denoiser, num_samples: int, seq_len: int, steps: int, vocab_size: int,
                     schedule: Schedule, seed: int, temperature: float = 1.0, batch_size: Optional[int] = None,
                     time_conditioned: bool = False, greedy_tail: bool = True, progress: bool = False,
                     device: Optional[torch.device | str] = None, greedy_last_step: bool = False,
                     first_sample: int = 0) -> SampleResult:
    """MDLM ancestral sampler: at t -> s each masked token is revealed with probability
    (alpha_s - alpha_t) / (1 - alpha_t), its value drawn from p_theta(. | z_t) / T (inverse CDF, float64);
    revealed tokens are kept. Masks left after the last step are filled greedily (``greedy_tail``)
    or sampled. ``greedy_last_step``: the tokens the final step t_{N-1} -> t_N reveals (~1/N of them) take
    argmax p_theta instead of a draw (docs/method.md section 7's "final step: greedy"; off by default, see
    docs/log.md "Greedy last step" for why). ``time_conditioned`` is kept for interface compatibility:
    lazy evaluation (module docstring) gives the same calls and results for both kinds of model."""
    return _run("ancestral", denoiser, num_samples, seq_len, steps, vocab_size, schedule, seed, temperature,
                batch_size, greedy_tail, progress, device=device, greedy_last_step=greedy_last_step,
                first_sample=first_sample)


def coupled_sample(denoiser: Denoiser, num_samples: int, seq_len: int, steps: int, vocab_size: int,
                   schedule: Schedule, seed: int, temperature: float = 1.0, batch_size: Optional[int] = None,
                   time_conditioned: bool = False, greedy_tail: bool = True, progress: bool = False,
                   reveal_order: str = "random", stride: Optional[int] = None,
                   device: Optional[torch.device | str] = None, greedy_last_step: bool = False,
                   first_sample: int = 0) -> SampleResult:
    """Deterministic coupled sampler: per-token threshold u and value uniform drawn once (keyed); at t -> s exactly
    the tokens with alpha_t <= u < alpha_s are revealed, each to the inverse-CDF draw of p_theta^(1/T) at its
    value uniform.
    Same seed -> same tokens, whatever the batch size. ``time_conditioned``: as in ancestral_sample.
    ``reveal_order``/``stride``: how the thresholds u are drawn (:func:`reveal_thresholds`); the stride
    defaults to ``min(steps, seq_len)``, one residue class per step. ``device``: where the network runs
    (the model's device; see :func:`_run` for what crosses). ``greedy_last_step``: as in ancestral_sample."""
    return _run("coupled", denoiser, num_samples, seq_len, steps, vocab_size, schedule, seed, temperature,
                batch_size, greedy_tail, progress, reveal_order, stride, device, greedy_last_step, first_sample)
