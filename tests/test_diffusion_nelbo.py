"""NELBO: weights, reference vs vocab-parallel (TP=1 in-process, TP=2 on gloo), the full estimator."""
import math

import torch

from mcd_scale.diffusion.nelbo import (MdlmLoss, NelboMeter, make_mdlm_labels, nelbo_loss_reference,
                                       nelbo_loss_vocab_parallel, nelbo_token_weights, perplexity_bound,
                                       vocab_parallel_subs_nll)
from mcd_scale.diffusion.schedules import get_schedule
from tests.mp import run_ranks


def _problem(V, Vp, B=3, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, Vp, generator=g, dtype=torch.float64) * 3
    logits[..., V:] = 50.0  # huge mask/pad logits: must be excluded, not merely small
    x = torch.randint(0, V, (B, L), generator=g)
    z = torch.where(torch.rand(B, L, generator=g) < 0.5, x, torch.full_like(x, V))
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return logits, x, z, t


def test_weights_are_minus_dalpha_over_one_minus_alpha():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    for name in ("loglinear", "cosine"):
        s = get_schedule(name)
        tt = t.clone().requires_grad_(True)
        (dalpha,) = torch.autograd.grad(s.alpha(tt).sum(), tt)  # independent derivative
        expected = -dalpha / (1 - s.alpha(t))
        z = torch.full((50, 3), 7)
        z[:, 1] = 4  # mask id 7; column 1 is revealed
        w = nelbo_token_weights(z, t, s, mask_id=7)
        assert w.dtype == torch.float32
        # tolerance: w is one float32 rounding of a float64 value (relative 2^-24 = 6e-8); 1e-6 = 16x that
        torch.testing.assert_close(w[:, 0].double(), expected, rtol=1e-6, atol=0)
        assert (w[:, 1] == 0).all()
    # log-linear: the weight is 1/t (exactly, since 1 - alpha_t = (1 - eps) t).
    w = nelbo_token_weights(torch.full((50, 1), 7), t, get_schedule("loglinear"), 7)[:, 0].double()
    # tolerance: one float32 rounding (6e-8 relative), as above
    torch.testing.assert_close(w, 1 / t, rtol=1e-6, atol=0)


def test_reference_matches_manual_formula():
    V, Vp = 11, 128
    logits, x, z, t = _problem(V, Vp)
    s = get_schedule("loglinear")
    total = 0.0
    for b in range(x.shape[0]):
        for l in range(x.shape[1]):
            if z[b, l] == V:
                row = logits[b, l, :V].tolist()
                lse = math.log(sum(math.exp(v) for v in row))
                total += (1 / float(t[b])) * (lse - row[int(x[b, l])])
    ref = nelbo_loss_reference(logits, x, z, t, s, V)
    # tolerance: float64 both sides, sums of B*L terms in different orders: ~n * 1e-16 relative, far below 1e-9
    assert abs(float(ref) - total / x.numel()) < 1e-9


def _tp_case(V, Vp, tp, rank, seed):
    logits, x, z, t = _problem(V, Vp, seed=seed)
    s = get_schedule("cosine")
    w = nelbo_token_weights(z, t, s, V)
    full = logits.float().requires_grad_(True)
    ref = nelbo_loss_reference(full, x, z, t, s, V)
    ref.backward()
    shard = Vp // tp
    part = logits.float()[..., rank * shard:(rank + 1) * shard].clone().requires_grad_(True)
    keep = part.detach().clone()
    return ref, full.grad[..., rank * shard:(rank + 1) * shard], part, keep, x, w


def test_vocab_parallel_tp1_equals_reference_without_distributed():
    assert not torch.distributed.is_initialized()
    for V, Vp in ((11, 128), (127, 128), (300, 384)):
        ref, ref_grad, part, keep, x, w = _tp_case(V, Vp, 1, 0, seed=V)
        loss = MdlmLoss(V, Vp)(part, (x, w))
        loss.backward()
        # tolerance: two float32 paths (sharded log-sum-exp vs log_softmax): each within ~(log2(B*L) + log2(V)) * 6e-8 ~
        # 1e-6
        # relative of the true mean; 1e-5 = 10x the worst case of both, the same on any CPU
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        # tolerance: softmax - onehot in float32 (relative ~1e-6 per entry, as above); atol 1e-7 for entries ~0 (p ~
        # 1e-7 * w)
        torch.testing.assert_close(part.grad, ref_grad, rtol=1e-5, atol=1e-7)
        assert torch.equal(part.detach(), keep)  # the caller's logits are not modified
        assert (part.grad[..., V:] == 0).all()


def test_bf16_logits_give_bf16_grads():
    V, Vp = 20, 128
    logits, x, z, t = _problem(V, Vp)
    w = nelbo_token_weights(z, t, get_schedule("loglinear"), V)
    lb = logits.bfloat16().requires_grad_(True)
    loss = nelbo_loss_vocab_parallel(lb, x, w, V, Vp, 0, 1)
    loss.backward()
    assert lb.grad.dtype == torch.bfloat16
    ref = nelbo_loss_reference(logits.bfloat16().double(), x, z, t, get_schedule("loglinear"), V)
    # tolerance: the reference uses the same bf16-rounded logits in float64, so only the float32 accumulation of the
    # bf16 path differs (~1e-6); 1e-4 also covers a bf16-precision intermediate if a backend keeps one
    assert abs(loss.item() - ref.item()) < 1e-4 * max(1.0, abs(float(ref)))


def _tp2_worker(cases):
    from mcd_scale.parallel.distributed import init_distributed

    dims = init_distributed(tp=2, pp=1)
    out = []
    for V, Vp in cases:
        ref, ref_grad, part, _, x, w = _tp_case(V, Vp, 2, dims.tp_rank, seed=V)
        loss = MdlmLoss(V, Vp, dims.tp_rank, dims.tp, dims.tp_group)(part, (x, w))
        loss.backward()
        # Default group (megatron-core's parallel_state) must give the same number.
        loss_default = nelbo_loss_vocab_parallel(part.detach(), x, w, V, Vp, dims.tp_rank, dims.tp)
        out.append((float(loss), float(ref), float(loss_default),
                    float((part.grad - ref_grad).abs().max()), float(ref_grad.abs().max())))
    return out


def test_vocab_parallel_tp2_equals_reference():
    # (40, 128): rank 1's shard is all padding; (100, 128): the mask id sits inside rank 1's shard.
    cases = [(40, 128), (100, 128), (200, 256)]
    results = run_ranks("tests.test_diffusion_nelbo:_tp2_worker", 2, {"cases": cases}, timeout=240)
    for rank, rank_res in enumerate(results):
        for (V, Vp), (loss, ref, loss_default, grad_err, grad_scale) in zip(cases, rank_res):
            # tolerance: float32 sharded vs float32 reference (the TP=1 bound above, plus one float32 all-reduce of 2
            # terms)
            assert abs(loss - ref) < 1e-5 * max(1.0, abs(ref))
            assert loss_default == loss
            # tolerance: gradient entries are w * (p - onehot) / (B*L) <= ~1e-2 here; float32 relative ~1e-6 -> < 1e-8
            # absolute;
            # 1e-6 is loose on purpose (a wrong shard offset gives O(1e-2))
            assert grad_err < 1e-6
            # A shard holding real columns has a non-trivial gradient; an all-padding one has none.
            assert (grad_scale > 0) == (rank * Vp // 2 < V)


def test_nll_shape_and_errors():
    V, Vp = 10, 128
    logits, x, _, _ = _problem(V, Vp)
    assert vocab_parallel_subs_nll(logits.float(), x, V, Vp, 0, 1).shape == x.shape
    for bad in (dict(padded_vocab=100), dict(vocab_size=128)):
        kw = dict(vocab_size=V, padded_vocab=Vp) | bad
        try:
            vocab_parallel_subs_nll(logits.float(), x, kw["vocab_size"], kw["padded_vocab"], 0, 1)
        except ValueError:
            continue
        raise AssertionError(f"no error for {bad}")


def test_uniform_model_nelbo_is_one_minus_eps_log_v():
    """Whole estimator: a model predicting uniform over V has CE = log V at every masked token, and
    E_t[w(t)(1 - alpha_t)] = -E[alpha'_t] ... = (1 - eps) for log-linear, so NELBO/token = (1-eps) log V."""
    V, Vp, G, L, eps, steps = 30, 128, 16, 256, 1e-3, 32
    s = get_schedule("loglinear", eps)
    loss_fn = MdlmLoss(V, Vp)
    meter = NelboMeter()
    x = torch.randint(0, V, (G, L), generator=torch.Generator().manual_seed(2))
    per_step = []
    for step in range(steps):
        z, t, labels = make_mdlm_labels(x, torch.arange(G), torch.arange(G), G, step, 0, s, V)
        logits = torch.zeros(G, L, Vp)
        nll = vocab_parallel_subs_nll(logits, labels[0], V, Vp, 0, 1)
        meter.update(nll, labels[1])
        per_step.append(float(loss_fn(logits, labels)))
        # tolerance: assert_close's float32 defaults (rtol 1.3e-6, atol 1e-5): zero logits make every term log V
        # exactly,
        # so both paths sum identical float32 terms; only the summation order differs
        torch.testing.assert_close(loss_fn(logits, labels), nelbo_loss_reference(logits, x, z, t, s, V))
    expected = (1 - eps) * math.log(V)
    # The steps are independent estimates: 4 standard errors of their own spread.
    per_step = torch.tensor(per_step, dtype=torch.float64)
    # tolerance: the meter accumulates float32 per-token sums in float64; per-step losses are float32 means (6e-8 rel)
    assert abs(meter.per_token - per_step.mean().item()) < 1e-6
    assert abs(meter.per_token - expected) < 4 * per_step.std().item() / math.sqrt(steps)
    assert meter.tokens == steps * G * L
    # tolerance: one float64 exp of the same number: equal up to rounding (1e-16); 1e-9 relative
    assert abs(meter.perplexity - math.exp(meter.per_token)) < 1e-9 * meter.perplexity
    assert perplexity_bound(1e4) == math.inf
