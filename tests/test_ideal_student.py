"""The ideal student (mcd_scale/eval/ideal_student.py) against the exact population optimum, enumerated.

Hand-sized case: S = 3, L = 5, three masked positions, the exact chain as teacher. Every clean completion
x ~ p(x | z_t), every reveal pattern of z_s (MCD) and every path of SDTT's two teacher steps is enumerated
with its probability; the expected loss's minimiser is then ideal.py's optimum with those probabilities as
weights. The ideal student estimates it from K keyed draws, so it must agree within Monte-Carlo error.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mcd_scale.diffusion.sampling import sampling_times
from mcd_scale.diffusion.schedules import LogLinear
from mcd_scale.distill.ideal import forward_kl_optimum, reverse_kl_optimum, sdtt_optimum
from mcd_scale.eval.ideal_student import ChainTeacher, IdealStudent
from mcd_scale.eval.synthetic import MarkovChain2

S, STEPS, K_STEP, DRAWS = 3, 4, 1, 3000
Z_T = torch.tensor([[3, 3, 1, 3, 3]])


def _setup():
    chain = MarkovChain2(S, branching=1, seed=1, fanout=2, concentration=0.5, floor=2e-2)
    teacher = ChainTeacher(chain, chunk=4096)
    sched = LogLinear()
    t, s = sampling_times(STEPS)[K_STEP:K_STEP + 2]
    a_t, a_s = (float(a) for a in sched.alpha(torch.stack([t, s])))
    return chain, teacher, sched, float(t), float(s), a_t, a_s


def _student(kind, chain, teacher, sched):
    return IdealStudent(kind, chain, teacher, STEPS, sched, draws=DRAWS, seed=5, chunk=4096)


def _call(student, t, z_t=Z_T):
    V = student.V
    return student(z_t, torch.tensor([t], dtype=torch.float32))[0, :, :V].exp()


def _switching_setup():
    """The regime-switching source (S = 4, H = 2: blocks {0, 1}, {2, 3}), its z_t with the mask id 4."""
    from mcd_scale.eval.synthetic import SwitchingChain

    # The two ends lie in different regimes' blocks, so a switch happens inside: the holes' reverse-KL optimum
    # is 0.058 (TV) from the exact marginal, enough for the test's power check.
    chain = SwitchingChain(4, regimes=2, seed=2, fanout=2, switch_prob=0.05, floor=2e-2, concentration=0.5)
    return chain, torch.tensor([[0, 4, 4, 4, 3]])


def _mcd_population(chain, teacher, a_t, a_s, Z_T=Z_T):
    """The exact expected MCD loss at each hole of Z_T: (holes, marginals given z_t [L, V], CE counts
    [L, V], teacher rows {pos: [J, V]}, their weights {pos: [J]}), weights = P(x | z_t) P(reveal pattern)
    unnormalised (both parts share the scale)."""
    L, S = Z_T.shape[1], chain.num_symbols
    hole = (Z_T[0] == S).nonzero().flatten().tolist()
    marg = teacher(Z_T, None)[0, :, :S]
    r = (a_s - a_t) / (1 - a_t)
    cases = []
    for fill in itertools.product(range(S), repeat=len(hole)):
        x = Z_T[0].clone()
        x[hole] = torch.tensor(fill)
        px = float(np.exp(-chain.nll(x[None].numpy())[0] * L))
        for pattern in itertools.product([0, 1], repeat=len(hole)):
            z_s = Z_T[0].clone()
            for pos, b in zip(hole, pattern):
                if b:
                    z_s[pos] = x[pos]
            cases.append((x, pattern, px * np.prod([r if b else 1 - r for b in pattern]), z_s))
    logp = teacher(torch.stack([c[3] for c in cases]), None)[..., :S]          # one batched teacher call
    counts = torch.zeros(L, S, dtype=torch.float64)
    rows, weights = {pos: [] for pos in hole}, {pos: [] for pos in hole}
    for (x, pattern, w, _), lp in zip(cases, logp):
        for pos, b in zip(hole, pattern):
            if b:
                counts[pos, x[pos]] += w
            else:
                rows[pos].append(lp[pos])
                weights[pos].append(w)
    return hole, marg, counts, rows, weights


@pytest.mark.parametrize("source", ["chain2", "switching"])
@pytest.mark.parametrize("kind", ["mcd-ideal", "mcd-ideal-fkl"])
def test_mcd_ideal_matches_the_enumerated_optimum(kind, source):
    chain, teacher, sched, t, s, a_t, a_s = _setup()
    z_t = Z_T
    if source == "switching":  # the same step on the second source (exact posterior over the regime path too)
        chain, z_t = _switching_setup()
        teacher = ChainTeacher(chain, chunk=4096)
    hole, marg, counts, rows, weights = _mcd_population(chain, teacher, a_t, a_s, z_t)
    got = _call(_student(kind, chain, teacher, sched), t, z_t)
    far = 0.0
    for pos in hole:
        p_rows = torch.stack(rows[pos])
        w = torch.tensor(weights[pos], dtype=torch.float64)
        c = counts[pos] / (counts[pos].sum() + w.sum())       # scale-free: both parts share the scale
        w = w / (counts[pos].sum() + w.sum())
        if kind == "mcd-ideal":
            want = reverse_kl_optimum(c, p_rows, w).exp()
            far = max(far, float(0.5 * (want - marg[pos].exp()).abs().sum()))
        else:
            want = forward_kl_optimum(c, p_rows, w).exp()
            # Tower property: the forward-KL optimum of an exact teacher is the exact marginal given z_t.
            torch.testing.assert_close(want, marg[pos].exp(), atol=1e-12, rtol=0)
        # Monte-Carlo error of DRAWS keyed draws: each q_v is a smooth function of means of DRAWS terms
        # in [0, 1] (standard error <= 0.5 / sqrt(3000) = 0.009 each).
        assert 0.5 * (got[pos] - want).abs().sum() < 0.025, (pos, got[pos], want)
    if kind == "mcd-ideal":  # the test has power: the optimum is far from the teacher's marginal at z_t
        assert far > 0.04


def test_sdtt_ideal_matches_the_enumerated_optimum():
    chain, teacher, sched, t, s, a_t, a_s = _setup()
    hole = (Z_T[0] == S).nonzero().flatten().tolist()
    times = torch.tensor([t, (t + s) / 2, s], dtype=torch.float64)   # t_floor never binds here
    al = sched.alpha(times)
    r = [float((al[i + 1] - al[i]) / (1 - al[i])) for i in range(2)]
    geo = torch.zeros(Z_T.shape[1], S, dtype=torch.float64)
    p0 = teacher(Z_T, None)[0, :, :S]
    # A step reveals each masked token with prob r_i, its value drawn from the teacher's marginal p_i.
    for step1 in itertools.product(range(S + 1), repeat=len(hole)):    # S = stays masked
        z1 = Z_T[0].clone()
        pr1 = 1.0
        for pos, v in zip(hole, step1):
            pr1 *= (1 - r[0]) if v == S else r[0] * float(p0[pos, v].exp())
            z1[pos] = v
        p1 = teacher(z1[None], None)[0, :, :S]
        left = [pos for pos in hole if z1[pos] == S]
        for step2 in itertools.product(range(S + 1), repeat=len(left)):
            pr2 = 1.0
            for pos, v in zip(left, step2):
                pr2 *= (1 - r[1]) if v == S else r[1] * float(p1[pos, v].exp())
            for pos in hole:   # target: p0 if revealed at step 0, else p1 (revealed at step 1 or never)
                geo[pos] += pr1 * pr2 * (p0[pos] if z1[pos] != S else p1[pos])
    got = _call(_student("sdtt-ideal", chain, teacher, sched), t)
    for pos in hole:
        want = sdtt_optimum(geo[pos][None]).exp()
        assert 0.5 * (got[pos] - want).abs().sum() < 0.025, (pos, got[pos], want)


def test_deterministic_per_row_and_refuses_an_off_grid_time():
    chain, teacher, sched, t, s, a_t, a_s = _setup()
    student = IdealStudent("mcd-ideal", chain, teacher, STEPS, sched, draws=8, seed=0)
    z = torch.tensor([[3, 0, 3, 3, 2], [3, 3, 3, 1, 3]])
    tt = torch.full((2,), t, dtype=torch.float32)
    both = student(z, tt)
    # a row's draws do not depend on its neighbours (equal up to float64 rounding of batched sums)
    torch.testing.assert_close(both[1:], student(z[1:], tt[1:]), atol=1e-9, rtol=0)
    inf = float("-inf")
    assert torch.equal(both[0, 1], torch.tensor([0.0, inf, inf, inf], dtype=torch.float64))  # revealed: point mass
    with pytest.raises(ValueError, match="grid"):
        student(z, torch.full((2,), 0.3))
    with pytest.raises(ValueError, match="kind"):
        IdealStudent("mcd", chain, teacher, STEPS, sched)


def test_tool_writes_rows_evaluate_reads_and_refuses_bad_input(tmp_path, capsys):
    import json
    import os
    import sys

    from mcd_scale.eval import evaluate, ideal_rows

    chain, *_ = _setup()
    path = str(tmp_path / "chain.json")
    chain.save(path)
    out = str(tmp_path / "samples.jsonl")
    assert ideal_rows.main(["--chain", path, "--seq-len", "5", "--steps", "2", "--teacher-steps", "4", "2",
                            "--teacher-temperatures", "1.0", "--num-samples", "3", "--draws", "2",
                            "--out", out, "--quiet"]) == 0
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert sorted({(r["model"], r["steps"]) for r in rows}) == [
        ("mcd-ceiling", 2), ("mcd-ideal", 2), ("mcd-ideal-fkl", 2), ("sdtt-ideal", 2), ("teacher", 2), ("teacher", 4)]
    assert all(len(r["ids"]) == 5 and r["teacher"] == "exact" for r in rows)
    assert evaluate.main(["--samples", out, "--synthetic-chain", path, "--out", str(tmp_path / "rep"),
                          "--reference-samples", "8"]) == 0
    capsys.readouterr()
    assert ideal_rows.main(["--chain", path, "--out", out]) == 2           # exact chain: no seq_len to read
    assert ideal_rows.main(["--chain", str(tmp_path / "none.json"), "--seq-len", "5", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("ideal_rows: error:") for line in err), err
