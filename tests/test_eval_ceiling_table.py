"""The honest-ceiling table (mcd_scale/eval/ceiling.py) on hand-built per-sample scores."""
from __future__ import annotations

import numpy as np
import pytest

from mcd_scale.eval.bootstrap import SampleScores
from mcd_scale.eval.ceiling import ceiling_table, render


def _s(entropy: float, nll: float, n: int = 30, seed: int = 0, spread: float = 0.01) -> SampleScores:
    rng = np.random.default_rng(seed)
    return SampleScores(nll + spread * rng.standard_normal(n), np.full(n, 64.0), np.full(n, entropy))


def test_table_reads_every_row_checks_k_doubling_and_shares():
    scores = {("teacher", 0, 256, 0.8, None): _s(3.0, 1.0), ("teacher", 0, 256, 1.0, None): _s(4.0, 2.0),
              ("teacher", 0, 16, 0.8, None): _s(3.0, 2.0), ("teacher", 0, 16, 1.0, None): _s(4.0, 3.0),
              ("mcd", 2, 16, 1.0, None): _s(3.5, 2.4, seed=1),           # gap closed 0.1
              ("mcd-ceiling", 0, 16, 1.0, 8): _s(3.5, 2.0, seed=2),      # 0.5
              ("mcd-ceiling", 0, 16, 1.0, 16): _s(3.5, 1.9, seed=3),     # 0.6
              ("mcd-ideal", 0, 16, 1.0, 12): _s(3.5, 1.5, seed=4)}       # 1.0
    t = ceiling_table(scores, 256, 16, draws=200)
    closed = {r["config"]: r["gap_closed"] for r in t["rows"]}
    gains = {r["config"]: r["gain_vs_few_nats"] for r in t["rows"]}
    # teacher@256 is 1 nat better than teacher@16 at every entropy (within teacher@16's own curve)
    assert gains["teacher @256 T 0.8"] == pytest.approx(1.0, abs=0.02)
    # tolerance: means of 30 samples with sd 0.01 noise
    assert closed["mcd r2 @16 T 1"] == pytest.approx(0.1, abs=0.02)
    assert closed["mcd-ceiling @16 T 1 K 8"] == pytest.approx(0.5, abs=0.02)
    (k,) = t["k_doubling"]
    assert k["vs"] == "mcd-ceiling @16 T 1 K 16" and k["quality_diff"] == pytest.approx(-0.1, abs=0.02)
    lo, hi = k["quality_diff_ci95"]
    assert lo < -0.08 and hi < 0 and k["paired"]
    shares = {(s["student"], s["ideal"]): s["share_ci95"] for s in t["shares"]}
    assert set(shares) == {("mcd r2 @16 T 1", "mcd-ceiling @16 T 1 K 8"), ("mcd r2 @16 T 1", "mcd-ceiling @16 T 1 K 16"),
                           ("mcd r2 @16 T 1", "mcd-ideal @16 T 1 K 12")}
    lo, hi = shares[("mcd r2 @16 T 1", "mcd-ideal @16 T 1 K 12")]
    assert lo < 0.1 < hi
    text = render(t)
    assert "mcd-ceiling @16 T 1 K 8 vs mcd-ceiling @16 T 1 K 16" in text


def test_table_needs_both_teacher_curves():
    with pytest.raises(ValueError, match="need teacher rows at 256 and 16"):
        ceiling_table({("teacher", 0, 16, 1.0, None): _s(3.0, 2.0)}, 256, 16)


def test_common_prefix_makes_every_configuration_pairable():
    from mcd_scale.eval.ceiling import common_prefix
    scores = {("teacher", 0, 256, 1.0, None): _s(4.0, 2.0, n=32), ("mcd-ceiling", 0, 16, 1.0, 8): _s(3.5, 2.0, n=16)}
    cut = common_prefix(scores)
    assert {len(v) for v in cut.values()} == {16}
    assert np.array_equal(cut[("teacher", 0, 256, 1.0, None)].nll, scores[("teacher", 0, 256, 1.0, None)].nll[:16])


def test_no_interval_where_the_point_lies_outside_the_curves():
    scores = {("teacher", 0, 256, 0.8, None): _s(3.0, 1.0), ("teacher", 0, 256, 1.0, None): _s(4.0, 2.0),
              ("teacher", 0, 16, 0.8, None): _s(3.0, 2.0), ("teacher", 0, 16, 1.1, None): _s(4.2, 3.2),
              # inside teacher@16's curve, 0.01 above teacher@256's: about half the draws land inside both
              ("mcd-ceiling", 0, 16, 1.0, 8): SampleScores(np.full(30, 2.0), np.full(30, 64.0),
                                                          4.01 + 0.05 * np.tile([1.0, -1.0], 15))}
    (row,) = [r for r in ceiling_table(scores, 256, 16, draws=200)["rows"] if r["key"][0] == "mcd-ceiling"]
    assert not np.isfinite(row["gap_closed"]) and row["gap_closed_ci95"] is None
    assert row["draws_outside_many_curve"] > 0
