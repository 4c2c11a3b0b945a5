"""The synthetic benchmark against brute force: NLL, normalisation, sampling law, entropy, oracle."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mcd_scale.eval.frontier import interpolate_quality_at_entropy
from mcd_scale.eval.metrics import mean_unigram_entropy
from mcd_scale.eval.synthetic import MarkovChain2, oracle_ancestral_sample, refresh_marginals


def small_chain(S: int = 4, seed: int = 3) -> MarkovChain2:
    # A large floor so that leak paths matter numerically in the brute-force comparisons.
    return MarkovChain2(S, branching=2, seed=seed, fanout=3, concentration=0.7, floor=1e-2)


def dense_transition(chain: MarkovChain2) -> np.ndarray:
    """P[a, b, c] built with plain loops from the tables (independent of the vectorised lookups)."""
    S, f = chain.num_symbols, chain.spec.floor
    P = np.full((S, S, S), f)
    for a in range(S):
        for b in range(S):
            for g, c in enumerate(chain.successors[b]):
                P[a, b, c] += (1 - S * f) * chain.probs[a, b, g]
    return P


def brute_logprob(chain: MarkovChain2, P: np.ndarray, x: tuple[int, ...]) -> float:
    lp = math.log(chain.pair_stationary[x[0], x[1]])
    for i in range(2, len(x)):
        lp += math.log(P[x[i - 2], x[i - 1], x[i]])
    return lp


def all_sequences(S: int, L: int) -> np.ndarray:
    return np.array(list(itertools.product(range(S), repeat=L)), dtype=np.int64)


def test_stationary_pairs_are_stationary_and_normalised():
    chain = small_chain()
    P = dense_transition(chain)
    pi = chain.pair_stationary
    # tolerance: float64 stationary vector of a small chain (eigen/power solve): ~1e-15; 1e-12
    assert abs(pi.sum() - 1) < 1e-12
    nxt = np.einsum("ab,abc->bc", pi, P)
    # tolerance: one float64 contraction of probabilities <= 1 over S^2 terms: ~S^2 * 1e-16
    np.testing.assert_allclose(nxt, pi, atol=1e-13)


def test_nll_matches_brute_force_and_probabilities_sum_to_one():
    chain = small_chain()
    P = dense_transition(chain)
    L = 5
    seqs = all_sequences(chain.num_symbols, L)
    nll = chain.nll(seqs)
    brute = np.array([-brute_logprob(chain, P, tuple(x)) / L for x in seqs])
    # tolerance: float64 log-probabilities of 5-symbol sequences, two summation orders
    np.testing.assert_allclose(nll, brute, rtol=1e-12)
    # tolerance: float64 sum of S^L probabilities (exp/log round trips): ~S^L * 1e-16
    assert abs(np.exp(-nll * L).sum() - 1.0) < 1e-10


def test_off_support_flags_exactly_the_leak_only_transitions():
    chain = small_chain()
    P = dense_transition(chain)
    seqs = all_sequences(chain.num_symbols, 4)
    flags = chain.off_support(seqs)
    brute = np.array([[P[x[i], x[i + 1], x[i + 2]] == chain.spec.floor for i in range(2)] for x in seqs])
    assert flags.shape == (len(seqs), 2) and brute.any() and (~brute).any()
    np.testing.assert_array_equal(flags, brute)
    # exact samples of a chain with a tiny leak almost never leave the support
    big = MarkovChain2(16, branching=2, seed=1, fanout=4)
    assert chain.off_support(seqs[:, :2]).shape == (len(seqs), 0)
    # statistical, not numeric: a seeded sample of a chain with a tiny leak
    assert big.off_support(big.sample(64, 64, seed=0)).mean() < 1e-3


def test_expected_nll_and_entropy_rate_match_enumeration():
    chain = small_chain()
    for L in (2, 3, 6):
        seqs = all_sequences(chain.num_symbols, L)
        nll = chain.nll(seqs)
        exact = float((np.exp(-nll * L) * nll).sum())
        # tolerance: float64 expectation vs enumeration of S^L sequences: rounding ~S^L * 1e-16
        assert abs(chain.expected_nll(L) - exact) < 1e-10
    # h = E[-log P(x_3 | x_1, x_2)] under stationarity = L*E_L - (L-1)*E_{L-1} for any L >= 3.
    # tolerance: float64 identity, differences of O(10) numbers: ~1e-14
    assert abs(6 * chain.expected_nll(6) - 5 * chain.expected_nll(5) - chain.entropy_rate()) < 1e-10


def test_sample_follows_the_exact_law():
    chain = small_chain()
    L, n = 3, 40000
    x = chain.sample(n, L, seed=11)
    seqs = all_sequences(chain.num_symbols, L)
    exact = np.exp(-chain.nll(seqs) * L)
    codes = (x * chain.num_symbols ** np.arange(L - 1, -1, -1)).sum(1)
    freq = np.bincount(codes, minlength=len(seqs)) / n
    # Total variation with 64 cells and 40k draws is ~0.02 when the law is right.
    assert 0.5 * np.abs(freq - exact).sum() < 0.035
    assert np.array_equal(x, chain.sample(n, L, seed=11))
    assert not np.array_equal(x, chain.sample(n, L, seed=12))


def test_json_round_trip_and_bad_input():
    chain = MarkovChain2(16, branching=2, seed=5, fanout=4)
    again = MarkovChain2.from_json(chain.to_json())
    x = chain.sample(20, 30, seed=0)
    np.testing.assert_array_equal(chain.nll(x), again.nll(x))
    assert again.entropy_rate() == chain.entropy_rate()
    with pytest.raises(ValueError, match="not a"):
        MarkovChain2.from_json('{"format": "other"}')
    with pytest.raises(ValueError, match="outside"):
        chain.nll(np.full((1, 4), 16))
    with pytest.raises(ValueError, match="branching"):
        MarkovChain2(8, branching=5, fanout=4)


def test_oracle_marginals_match_enumeration_including_impossible_evidence():
    chain = small_chain(S=4, seed=8)
    L, S = 6, 4
    seqs = all_sequences(S, L)
    prob = np.exp(-chain.nll(seqs) * L)
    gen = np.random.default_rng(0)
    z = torch.from_numpy(np.where(gen.random((12, L)) < 0.45, gen.integers(0, S, (12, L)), S))
    z[0] = S                                                    # fully masked
    got = chain.oracle_log_marginals(z).exp().numpy()
    for row in range(z.shape[0]):
        keep = np.all((z[row].numpy() == S) | (seqs == z[row].numpy()), axis=1)
        w = prob * keep
        for pos in range(L):
            want = np.bincount(seqs[:, pos], weights=w, minlength=S) / w.sum()
            # tolerance: float64 forward-backward vs enumeration: rounding of products of <= L probabilities
            np.testing.assert_allclose(got[row, pos], want, atol=1e-10)


def test_incremental_refresh_equals_full_recomputation():
    chain = MarkovChain2(12, branching=2, seed=2, fanout=4)
    gen = np.random.default_rng(1)
    n, L = 6, 40
    z = torch.from_numpy(np.where(gen.random((n, L)) < 0.5, chain.sample(n, L, seed=4), 12))
    logp = chain.oracle_log_marginals(z)
    new = (z == 12) & torch.from_numpy(gen.random((n, L)) < 0.15)
    z[new] = torch.from_numpy(gen.integers(0, 12, int(new.sum())))   # includes impossible reveals
    refresh_marginals(chain, z, logp, new, chunk=4)
    full = chain.oracle_log_marginals(z)
    # tolerance: incremental vs full float64 recomputation of the same marginals: rounding only
    assert torch.allclose(logp.exp(), full.exp(), atol=1e-12)


def test_many_steps_beat_few_steps_at_matched_entropy():
    """The benchmark's point: exact marginals + parallel reveals lose; one-at-a-time is near exact."""
    chain = MarkovChain2(64, branching=3, seed=0)
    L, n = 64, 24
    many, _ = oracle_ancestral_sample(chain, n, L, steps=L, seed=0)
    nll_many, ent_many = float(chain.nll(many).mean()), mean_unigram_entropy(many)
    few = []
    for T in (1.0, 0.8, 0.6, 0.4):
        x, nfe = oracle_ancestral_sample(chain, n, L, steps=L // 16, seed=0, temperature=T)
        assert nfe <= L // 16
        few.append((mean_unigram_entropy(x), float(chain.nll(x).mean())))
    at = interpolate_quality_at_entropy(few, ent_many)
    assert at.in_range, (few, ent_many)
    # Measured: many steps ~0.9 nats/token (expected NLL of true samples 0.715); few steps ~3+ nats/token.
    assert nll_many < chain.expected_nll(L) + 0.4
    assert at.quality > nll_many + 1.0
