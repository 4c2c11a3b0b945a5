"""Carry-over (docs/method.md §7, SUBS): a token keeps its value from the step that reveals it to the end, in every
sampler of mcd_scale/diffusion/sampling.py.

The network sees the sampler's whole state at every call, so a recording denoiser observes each sample's
trajectory: z before every evaluated step, then the returned tokens. Between any two observations the
revealed set may only grow and a revealed position may never change value. The denoiser's logits depend
strongly on the whole row, so a sampler that re-draws revealed tokens (even on steps it evaluates anyway,
i.e. without extra network calls, which the NFE tests would not see) changes some of them and fails here.

Samples run one per batch (``batch_size=1``) so each call is one sample's state; a sample's first call
is its all-mask state (nothing is revealed before the network is consulted), which splits the record.
The batched run must give the same tokens (the samplers' batch-size invariance), so the batched code
path is covered by the same check through its output.
"""
from __future__ import annotations

import os

import pytest
import torch

from mcd_scale.diffusion.sampling import ancestral_sample, coupled_sample
from mcd_scale.diffusion.schedules import Schedule, get_schedule

V, L, N = 7, 12, 3  # 7 real tokens (mask id 7), 12 positions, 3 samples
VP = 9  # one padding column beyond the mask: SUBS must ignore both


class RowHashDenoiser:
    """Logits = a random linear map of the one-hot row (every position sees every other one), scaled so a
    changed context moves the argmax; mask/padding columns get large logits SUBS must drop. Records inputs."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(L * (V + 1), L * VP, generator=g, dtype=torch.float64) * 2.0
        self.seen: list[torch.Tensor] = []

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(z.clone())
        onehot = torch.nn.functional.one_hot(z, V + 1).double().reshape(z.shape[0], -1)
        logits = (onehot @ self.proj).reshape(z.shape[0], L, VP)
        logits[..., V:] = 50.0
        return logits.float()


class ModelDenoiser:
    """A tiny time-conditioned transformer (the model a teacher or a student is), weights perturbed away
    from the init so the outputs depend on context and time. Records inputs."""

    def __init__(self):
        from mcd_scale.config import load_config
        from mcd_scale.model.build import build_model
        from tests.mp import REPO

        cfg = load_config([os.path.join(REPO, "configs/tiny/teacher.yaml")],
                          ["model.hidden=32", "model.layers=1", "model.heads=2", "model.ffn_hidden=64",
                           f"model.vocab_size={V}", f"model.seq_len={L}", "model.pad_vocab_multiple=8",
                           "model.time_conditioning=true", "model.cond_dim=16"])
        torch.manual_seed(3)
        self.model = build_model(cfg, None, init=True).eval()
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        self.seen: list[torch.Tensor] = []

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(z.clone())
        return self.model(z, t)


def _trajectories(seen: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Split one-row call inputs into per-sample state sequences (a sample starts all-masked)."""
    out: list[list[torch.Tensor]] = []
    for z in seen:
        assert z.shape == (1, L), f"batch_size=1 run sent {tuple(z.shape)} rows"
        if bool((z == V).all()):
            out.append([])
        assert out, "the first network call of a sample must see it fully masked (nothing revealed yet)"
        out[-1].append(z[0])
    return out


def _assert_carry_over(states: list[torch.Tensor], label: str) -> None:
    for k in range(len(states) - 1):
        before, after = states[k], states[k + 1]
        revealed = before != V
        assert not bool((after[revealed] == V).any()), f"{label}: a revealed token was masked again at call {k + 1}"
        changed = revealed & (after != before)
        assert not bool(changed.any()), (
            f"{label}: revealed tokens changed between observation {k} and {k + 1} at positions "
            f"{changed.nonzero().flatten().tolist()}: {before[changed].tolist()} -> {after[changed].tolist()}")


class PartialReveal(Schedule):
    """alpha_t = 0.6 (1 - t): 40% of the tokens are still masked after the last step, so the final fill
    (greedy or sampled) does real work; with the built-in schedules it fills ~L * 1e-5 tokens."""
    name = "partial"

    def alpha(self, t):
        return 0.6 * (1.0 - t)


SAMPLERS = {
    "ancestral": lambda den, steps, greedy, bs: ancestral_sample(
        den, N, L, steps, V, get_schedule("loglinear"), seed=5, greedy_tail=greedy, batch_size=bs),
    "ancestral-cosine": lambda den, steps, greedy, bs: ancestral_sample(
        den, N, L, steps, V, get_schedule("cosine"), seed=6, temperature=0.8, greedy_tail=greedy, batch_size=bs),
    "coupled-random": lambda den, steps, greedy, bs: coupled_sample(
        den, N, L, steps, V, get_schedule("loglinear"), seed=5, greedy_tail=greedy, batch_size=bs),
    "coupled-strided": lambda den, steps, greedy, bs: coupled_sample(
        den, N, L, steps, V, get_schedule("loglinear"), seed=5, greedy_tail=greedy, batch_size=bs,
        reveal_order="strided"),
    "coupled-strided-4": lambda den, steps, greedy, bs: coupled_sample(
        den, N, L, steps, V, get_schedule("loglinear"), seed=7, temperature=1.3, greedy_tail=greedy,
        batch_size=bs, reveal_order="strided", stride=4),
    "ancestral-final-fill": lambda den, steps, greedy, bs: ancestral_sample(
        den, N, L, steps, V, PartialReveal(), seed=8, greedy_tail=greedy, batch_size=bs),
    "coupled-final-fill": lambda den, steps, greedy, bs: coupled_sample(
        den, N, L, steps, V, PartialReveal(), seed=8, greedy_tail=greedy, batch_size=bs),
}


# Fewer steps than tokens (several reveals per step, greedy tail) and many more (one reveal per evaluated
# step, sampled tail).
@pytest.mark.parametrize("steps,greedy", [(4, True), (40, False)])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_revealed_tokens_never_change(name, steps, greedy):
    den = RowHashDenoiser()
    res = SAMPLERS[name](den, steps, greedy, 1)
    trajs = _trajectories(den.seen)
    assert len(trajs) == N, f"{name}: {len(trajs)} sample trajectories observed, expected {N}"
    for i, states in enumerate(trajs):
        final = res.tokens[i]
        assert not bool((final == V).any()) and int(final.min()) >= 0 and int(final.max()) < V
        _assert_carry_over(states + [final], f"{name} steps={steps} greedy={greedy} sample {i}")
    # The batched path (rows of several samples per call) returns the same tokens.
    batched = SAMPLERS[name](RowHashDenoiser(), steps, greedy, N)
    assert torch.equal(batched.tokens, res.tokens), f"{name}: batch_size={N} differs from batch_size=1"


@pytest.mark.parametrize("name", ["ancestral", "coupled-random", "coupled-strided"])
def test_revealed_tokens_never_change_with_a_transformer(name):
    den = ModelDenoiser()
    res = SAMPLERS[name](den, 6, True, 1)
    trajs = _trajectories(den.seen)
    assert len(trajs) == N
    for i, states in enumerate(trajs):
        _assert_carry_over(states + [res.tokens[i]], f"{name} (transformer) sample {i}")


def test_the_check_sees_a_redraw():
    """The observation itself: a denoiser wrapper that rewrites a revealed token between calls is caught
    (guards against a check that compares a state with itself)."""
    states = [torch.full((L,), V), torch.tensor([1] + [V] * (L - 1)), torch.tensor([2] + [V] * (L - 1))]
    with pytest.raises(AssertionError, match="revealed tokens changed"):
        _assert_carry_over(states, "synthetic")
    with pytest.raises(AssertionError, match="masked again"):
        _assert_carry_over([states[1], states[0]], "synthetic")
