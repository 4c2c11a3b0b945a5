"""The population optimum of the distillation losses (mcd_scale/distill/ideal.py) against brute force:
minimise the expected loss over q directly (float64 L-BFGS on logits) for hand-sized random cases."""
from __future__ import annotations

import pytest
import torch

from mcd_scale.distill.ideal import forward_kl_optimum, reverse_kl_optimum, sdtt_optimum


def _case(seed: int, V: int = 5, K: int = 6):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(2.0 * torch.randn(K, V, generator=g, dtype=torch.float64), -1)
    masked = torch.rand(K, generator=g) < 0.6
    masked[0], masked[1] = True, False              # both parts present
    x = torch.randint(0, V, (K,), generator=g)
    counts = torch.zeros(V, dtype=torch.float64)
    counts.index_add_(0, x[~masked], torch.ones(int((~masked).sum()), dtype=torch.float64))
    return counts, teacher, masked


def _expected_loss(logits, counts, teacher, masked, divergence):
    logq = torch.log_softmax(logits, -1)
    ce = -(counts * logq).sum()
    t = teacher[masked]
    if divergence == "reverse":
        kl = (logq.exp() * (logq - t)).sum()
    else:
        kl = (t.exp() * (t - logq)).sum()
    return ce + kl


def _brute(counts, teacher, masked, divergence):
    logits = torch.zeros(counts.shape[-1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _expected_loss(logits, counts, teacher, masked, divergence)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return torch.log_softmax(logits.detach(), -1)


@pytest.mark.parametrize("seed", range(4))
def test_reverse_and_forward_optimum_match_brute_force(seed):
    counts, teacher, masked = _case(seed)
    for divergence, fn in (("reverse", reverse_kl_optimum), ("forward", forward_kl_optimum)):
        got = fn(counts, teacher, masked)
        want = _brute(counts, teacher, masked, divergence)
        assert torch.allclose(got.exp(), want.exp(), atol=1e-6), (divergence, got.exp(), want.exp())
        # and it is a minimum: no perturbation lowers the expected loss
        base = _expected_loss(got, counts, teacher, masked, divergence)
        g = torch.Generator().manual_seed(seed)
        for _ in range(20):
            bumped = got + 1e-3 * torch.randn(got.shape, generator=g, dtype=torch.float64)
            assert _expected_loss(bumped, counts, teacher, masked, divergence) >= base - 1e-12


def test_limits_and_batching():
    counts, teacher, masked = _case(7)
    # No draw reveals the token: the reverse-KL optimum is the normalised geometric mean; forward the mixture.
    none = torch.zeros_like(counts)
    allm = torch.ones_like(masked)
    geo = torch.log_softmax(teacher.mean(0), -1)
    assert torch.allclose(reverse_kl_optimum(none, teacher, allm), geo, atol=1e-9)
    mix = torch.log(teacher.exp().mean(0))
    assert torch.allclose(forward_kl_optimum(none, teacher, allm), mix, atol=1e-12)
    # The geometric mean is not the mixture (why the reverse-KL optimum is not the teacher's marginal).
    assert (geo.exp() - mix.exp()).abs().max() > 0.02
    # Every draw reveals it: the empirical law, for both divergences.
    nom = torch.zeros_like(masked)
    emp = torch.log(counts / counts.sum())
    assert torch.allclose(reverse_kl_optimum(counts, teacher, nom), emp)
    # SDTT: geometric mean of its targets.
    assert torch.allclose(sdtt_optimum(teacher), geo, atol=1e-12)
    # Batched over leading dimensions = one at a time.
    cases = [_case(s) for s in range(3)]
    batch = reverse_kl_optimum(torch.stack([c[0] for c in cases]), torch.stack([c[1] for c in cases]),
                               torch.stack([c[2] for c in cases]))
    for i, c in enumerate(cases):
        assert torch.allclose(batch[i], reverse_kl_optimum(*c), atol=1e-10)


def test_closed_form_inner_solve_is_exact_where_bisection_was_bounded():
    """The per-symbol solve y = b + W((n/m) e^{-b}) (Lambert W by Newton in log space): the residual of
    w + log w = a is at float64 precision from a = -50 (w ~ 1e-22) to a = 1e6 (no overflow)."""
    from mcd_scale.distill.ideal import _lambert_w_of_exp

    a = torch.tensor([-50.0, -5.0, -1.0, 0.0, 0.5, 1.0, 1.5, 2.718, 20.0, 1e4, 1e6], dtype=torch.float64)
    w = _lambert_w_of_exp(a)
    assert torch.isfinite(w).all() and (w > 0).all()
    torch.testing.assert_close(w + torch.log(w), a, atol=1e-9, rtol=1e-15)


def test_fractional_masked_weights_scale_the_geometric_mean():
    """masked may carry weights (tests/test_ideal_student.py passes importance weights summing to < 1): with
    no CE part the optimum is softmax(G / m) for the weighted m, not for m clamped to 1."""
    _, teacher, _ = _case(3)
    w = torch.full((teacher.shape[0],), 0.05, dtype=torch.float64)  # m = 0.3
    got = reverse_kl_optimum(torch.zeros(teacher.shape[-1], dtype=torch.float64), teacher, w)
    want = torch.log_softmax((teacher * w.unsqueeze(-1)).sum(0) / w.sum(), -1)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # and with a CE part, still the minimiser of the weighted expected loss (brute force)
    counts = torch.zeros(teacher.shape[-1], dtype=torch.float64)
    counts[1] = 0.2
    got = reverse_kl_optimum(counts, teacher, w).exp()
    logits = torch.zeros(teacher.shape[-1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logq = torch.log_softmax(logits, -1)
        loss = -(counts * logq).sum() + (w.unsqueeze(-1) * logq.exp() * (logq - teacher)).sum()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    torch.testing.assert_close(got, torch.softmax(logits.detach(), -1), atol=1e-6, rtol=0)
