"""Evaluation metrics of docs/method.md §8: per-sample unigram entropy, Gen PPL, and sampling cost.

- Entropy: for each generated sample, the entropy (nats) of the empirical distribution of its ids,
  ``H = -sum_v (n_v / L) log(n_v / L)``; the reported figure is the mean over samples. It detects
  collapse (repetition) that a better Gen PPL can hide.
- Gen PPL: ``exp`` of the token-weighted mean NLL (nats/token) of the samples under an evaluator, i.e.
  total NLL over total scored tokens, so longer samples weigh more, as in a corpus perplexity.
- Cost: seconds per sample and network evaluations (NFE) per sample, from totals of the same run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np


def unigram_entropy(ids: Sequence[int] | np.ndarray) -> float:
    """Entropy (nats) of the empirical unigram distribution of one sample's ids."""
    arr = np.asarray(ids).ravel()
    if arr.size == 0:
        raise ValueError("unigram entropy of an empty sample is undefined")
    _, counts = np.unique(arr, return_counts=True)
    p = counts / arr.size
    return float(-(p * np.log(p)).sum())


def per_sample_unigram_entropy(samples: Iterable[Sequence[int] | np.ndarray]) -> np.ndarray:
    """Unigram entropy of each sample (rows of a 2-D array, or a list of ragged id sequences)."""
    return np.array([unigram_entropy(s) for s in samples], dtype=np.float64)


def mean_unigram_entropy(samples: Iterable[Sequence[int] | np.ndarray]) -> float:
    """The §8 entropy figure: mean over samples of the per-sample unigram entropy (nats)."""
    values = per_sample_unigram_entropy(samples)
    if values.size == 0:
        raise ValueError("no samples to compute entropy over")
    return float(values.mean())


def token_weighted_nll(nll_per_token: Sequence[float] | np.ndarray, num_tokens: Sequence[int] | np.ndarray) -> float:
    """Total NLL / total tokens, from each sequence's mean NLL per token and its scored-token count."""
    nll = np.asarray(nll_per_token, dtype=np.float64)
    n = np.asarray(num_tokens, dtype=np.float64)
    if nll.shape != n.shape or nll.size == 0:
        raise ValueError(f"need matching non-empty arrays, got shapes {nll.shape} and {n.shape}")
    if (n <= 0).any():
        raise ValueError("every scored sequence needs at least one token")
    return float((nll * n).sum() / n.sum())


def gen_ppl(nll_per_token: Sequence[float] | np.ndarray, num_tokens: Sequence[int] | np.ndarray) -> float:
    """Generative perplexity: exp(token-weighted mean NLL in nats)."""
    return math.exp(token_weighted_nll(nll_per_token, num_tokens))


@dataclass(frozen=True)
class SamplingCost:
    """Totals of one sampling run; per-sample figures are derived so they stay consistent."""
    num_samples: int
    seconds: float
    nfe_total: float
    """Network evaluations summed over samples (a batched call counts once per sample in it)."""

    def __post_init__(self) -> None:
        if self.num_samples <= 0 or self.seconds < 0 or self.nfe_total < 0:
            raise ValueError(f"invalid sampling cost {self}")

    @property
    def seconds_per_sample(self) -> float:
        return self.seconds / self.num_samples

    @property
    def nfe_per_sample(self) -> float:
        return self.nfe_total / self.num_samples


def speedup(reference: float | None, candidate: float | None) -> float:
    """reference / candidate (e.g. teacher@N seconds over student seconds); NaN when unknown or zero."""
    if reference is None or candidate is None or not candidate > 0 or not math.isfinite(reference):
        return math.nan
    return float(reference) / float(candidate)
