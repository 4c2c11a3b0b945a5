"""The honest ceiling (``mcd-ceiling`` in mcd_scale/eval/ideal_student.py): teacher continuations as data,
one independent draw set per position class. Checked against the exact chain (an independent reference)."""
from __future__ import annotations

import torch

from mcd_scale.diffusion.sampling import ancestral_sample, sampling_times
from mcd_scale.diffusion.schedules import LogLinear
from mcd_scale.eval.ideal_student import ChainTeacher, IdealStudent
from mcd_scale.eval.synthetic import MarkovChain2
from mcd_scale.rng import keyed_generator


def _chain(S: int = 3):
    return MarkovChain2(S, branching=1, seed=1, fanout=2, concentration=0.5, floor=2e-2)


def test_continuation_of_the_exact_denoiser_draws_the_exact_posterior():
    # With the exact chain as the teacher, its many-step continuation of z_t is a draw of p(x | z_t):
    # the empirical marginals of many continuations must match the chain's exact posterior marginals.
    chain = _chain()
    S = chain.num_symbols
    teacher = ChainTeacher(chain, chunk=4096)
    student = IdealStudent("mcd-ceiling", chain, teacher, 4, LogLinear(), draws=1, continuation_steps=8)
    z = torch.tensor([[S, S, 1, S, S]])
    R = 4000
    gens = [keyed_generator("test-continuation", i) for i in range(R)]
    x = student.continuation(z.repeat(R, 1), 0.75, gens)
    assert (x < S).all() and (x[:, 2] == 1).all()
    emp = torch.nn.functional.one_hot(x, S).double().mean(0)                       # [L, S]
    exact = chain.oracle_log_marginals(z, chunk=4096)[0].exp()
    # tolerance: 4000 draws, binomial sd <= 0.008 per cell; 0.035 is > 4 sd
    assert (emp - exact).abs().max() < 0.035
    # the case must have real uncertainty, or a mode-seeking continuation would pass too
    assert ((exact > 0.1) & (exact < 0.9)).any()


def test_ceiling_with_the_exact_teacher_matches_the_oracle_ideal_in_law():
    # Exact teacher: teacher continuations = exact posterior draws, so with one draw set (groups = 1) the
    # ceiling and the oracle ideal estimate the same optimum; with many draws both approach it.
    chain = _chain()
    S = chain.num_symbols
    teacher = ChainTeacher(chain, chunk=4096)
    z = torch.tensor([[S, S, 1, S, S]])
    t = torch.tensor([float(sampling_times(4)[1])], dtype=torch.float32)
    kw = dict(draws=1500, seed=3, chunk=4096)
    ceil = IdealStudent("mcd-ceiling", chain, teacher, 4, LogLinear(), groups=1, continuation_steps=16, **kw)
    oracle = IdealStudent("mcd-ideal", chain, teacher, 4, LogLinear(), **kw)
    qc, qo = ceil(z, t)[0, :, :S].exp(), oracle(z, t)[0, :, :S].exp()
    # tolerance: two independent 1500-draw estimates of the same optimum (sd ~0.012 per cell each)
    assert (qc - qo).abs().max() < 0.06
    # and every position of the ceiling is a distribution (masked ones) or the point mass (revealed)
    assert torch.allclose(ceil(z, t)[0, :, :S].exp().sum(-1), torch.ones(5, dtype=torch.float64))


def test_independent_draw_sets_remove_the_joint_leak():
    # With K = 1 and one shared draw set, every position reads the same joint continuation: sampling the
    # factorised "student" then copies a joint sample of the teacher, far better than any factorised
    # prediction could do. One draw set per position (groups = L) removes that leak: its samples' true NLL is
    # clearly worse. A near-deterministic chain makes the leak large.
    chain = MarkovChain2(8, branching=1, seed=4, fanout=1, concentration=0.5, floor=1e-3)
    S, L, steps = chain.num_symbols, 12, 2
    teacher = ChainTeacher(chain, chunk=4096)

    def nll(groups: int) -> float:
        st = IdealStudent("mcd-ceiling", chain, teacher, steps, LogLinear(), draws=1, seed=0, groups=groups,
                          continuation_steps=8, chunk=4096)
        res = ancestral_sample(st, 24, L, steps, S, LogLinear(), 0, batch_size=24)
        return float(chain.nll(res.tokens.numpy()).mean())

    shared, independent = nll(1), nll(L)
    assert shared + 0.2 < independent, (shared, independent)
