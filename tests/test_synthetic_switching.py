"""The regime-switching source (mcd_scale/eval/synthetic/switching.py) against brute force on short sequences:
enumerate every (regime path, sequence) of a hand-sized source."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mcd_scale.eval.synthetic import MarkovChain2, load_source
from mcd_scale.eval.synthetic import SwitchingChain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small() -> SwitchingChain:
    return SwitchingChain(num_symbols=4, regimes=2, seed=4, fanout=2, concentration=1.0, switch_prob=0.2, floor=0.01)


def _brute(src: SwitchingChain, L: int) -> dict[tuple, float]:
    """p(x) for every x in S^L by summing the generative story over every regime path (no recursion)."""
    S, H, rho = src.num_symbols, src.spec.regimes, src.spec.switch_prob
    # P_h(c | b) straight from the tables (not from src.emission): successors/probs + uniform leak.
    def emit(h, b, c):
        p = sum(src.probs[h, b, g] for g in range(src.spec.fanout) if src.successors[h, b, g] == c)
        return (1 - S * src.spec.floor) * p + src.spec.floor

    out = {}
    for x in itertools.product(range(S), repeat=L):
        total = 0.0
        for hs in itertools.product(range(H), repeat=L):
            p = (1.0 / H) * (1.0 / S)
            for pos in range(1, L):
                p *= (1 - rho) if hs[pos] == hs[pos - 1] else rho / (H - 1)
                p *= emit(hs[pos], x[pos - 1], x[pos])
            total += p
        out[x] = total
    return out


def test_nll_is_the_exact_likelihood_by_brute_force():
    src, L = _small(), 4
    probs = _brute(src, L)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)
    xs = np.array(list(probs))
    assert np.allclose(src.log_prob(xs), np.log([probs[tuple(x)] for x in xs]), rtol=0, atol=1e-12)
    assert np.allclose(src.nll(xs), -np.log([probs[tuple(x)] for x in xs]) / L, atol=1e-12)


def test_sampler_draws_the_brute_force_law():
    src, L, n = _small(), 3, 60000
    probs = _brute(src, L)
    x = src.sample(n, L, seed=0)
    counts = {}
    for row in map(tuple, x.tolist()):
        counts[row] = counts.get(row, 0) + 1
    emp = np.array([counts.get(k, 0) / n for k in probs])
    p = np.array(list(probs.values()))
    # every cell within 5 standard errors; total variation small
    assert np.all(np.abs(emp - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-9), np.abs(emp - p).max()
    assert 0.5 * np.abs(emp - p).sum() < 0.02
    assert np.array_equal(x, src.sample(n, L, seed=0)) and not np.array_equal(x, src.sample(n, L, seed=1))


def test_oracle_marginals_match_brute_force_conditionals():
    src, L = _small(), 4
    probs = _brute(src, L)
    m = src.mask_id
    for z in ([m, m, m, m], [1, m, m, 0], [m, 2, m, m], [0, m, 1, m]):
        got = src.oracle_log_marginals(torch.tensor([z])).exp()[0].numpy()
        consistent = {x: p for x, p in probs.items() if all(zi == m or zi == xi for zi, xi in zip(z, x))}
        total = sum(consistent.values())
        for pos in range(L):
            want = np.zeros(src.num_symbols)
            for x, p in consistent.items():
                want[x[pos]] += p / total
            assert np.allclose(got[pos], want, atol=1e-12), (z, pos, got[pos], want)


def _far_information(src, n: int = 32, L: int = 40, lo: int = 10, far: int = 16) -> float:
    """Mean KL(P(x_{lo+1+far} | x_lo, x_{lo+1}) || P(x_{lo+1+far})) over n sampled pairs (exact oracle): what a
    revealed pair tells about a token ``far`` positions away."""
    x = torch.from_numpy(src.sample(n, L, seed=7))
    z = torch.full((n, L), src.mask_id, dtype=torch.long)
    z[:, lo:lo + 2] = x[:, lo:lo + 2]
    cond = src.oracle_log_marginals(z)[:, lo + 1 + far]
    prior = src.oracle_log_marginals(torch.full((1, L), src.mask_id, dtype=torch.long))[0, lo + 1 + far]
    return float((cond.exp() * (cond - prior)).sum(-1).mean())


def test_long_range_dependence_spans_the_stride():
    """What makes this source different from the order-2 chain: a revealed pair still informs a token 16
    positions away (through the slowly mixing regime); on the order-2 chain that information is ~gone."""
    switching = _far_information(SwitchingChain(64, regimes=4, seed=1234, fanout=4, switch_prob=1 / 64))
    chain = _far_information(MarkovChain2(64, branching=4, seed=1234, fanout=4, concentration=1.0))
    assert switching > 0.05 and switching > 10 * chain, (switching, chain)


def test_json_round_trip_and_load_source(tmp_path):
    src = _small()
    path = str(tmp_path / "source.json")
    src.save(path)
    back = load_source(path)
    assert isinstance(back, SwitchingChain) and back.spec == src.spec
    x = src.sample(5, 6, seed=2)
    assert np.array_equal(back.nll(x), src.nll(x))
    chain = MarkovChain2(8, branching=2, seed=0, fanout=3)
    chain.save(str(tmp_path / "chain.json"))
    assert isinstance(load_source(str(tmp_path / "chain.json")), MarkovChain2)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="bad.json"):
        load_source(str(tmp_path / "bad.json"))


def test_prepare_synthetic_writes_the_switching_source(tmp_path):
    out = tmp_path / "syn"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "prepare_synthetic.py"), "--out", str(out),
                        "--source", "switching", "--seq-len", "16", "--train", "8", "--validation", "4",
                        "--heldout", "4", "--num-symbols", "8", "--regimes", "2", "--fanout", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["chain"]["source"] == "switching" and manifest["chain"]["regimes"] == 2
    src = load_source(str(out / "chain.json"))
    assert isinstance(src, SwitchingChain)
    from mcd_scale.data.loader import open_prepared
    ds = open_prepared(str(out), "train")
    ids = np.stack([ds[i]["ids"].astype(np.int64) for i in range(len(ds))])
    assert ids.shape == (8, 16) and np.isfinite(src.nll(ids)).all()
    assert np.array_equal(ids, src.sample(8, 16, seed=__import__("mcd_scale.rng", fromlist=["key_to_seed"])
                                          .key_to_seed("synthetic.split.train", 1234, 0)))
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "prepare_synthetic.py"), "--out",
                          str(tmp_path / "bad"), "--source", "switching", "--regimes", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "regimes" in bad.stderr


def test_each_regime_emits_from_its_own_block():
    src = SwitchingChain(64, regimes=4, seed=1234, fanout=4)
    blocks = np.array_split(np.arange(64), 4)
    for h in range(4):
        assert np.isin(src.successors[h], blocks[h]).all()
    with pytest.raises(ValueError, match="fanout"):
        SwitchingChain(8, regimes=4, fanout=3)
