"""The "ideal student": a Denoiser that predicts the population optimum of a distillation loss.

What a student trained to convergence on infinite data would predict for the jump t -> s it is sampled
with (docs/distill.md, "What the MCD loss converges to"). For a sampler step t -> s and an input z_t it
draws K coupled continuations per row and combines the teacher's outputs with mcd_scale/distill/ideal.py:

- ``mcd-ideal`` (reverse KL, MCD's default loss) and ``mcd-ideal-fkl`` (forward KL, the control):
  x^k ~ p(x | z_t) exactly from the chain (mcd_scale/eval/chain_posterior.py: the clean data the student
  would have been trained on, given its input), z_s^k by the training coupling (each token masked at t is
  still masked at s with probability (1 - alpha_s) / (1 - alpha_t), independently; else it shows x^k), the
  teacher on z_s^k. A token revealed at s counts toward the CE part (n_v), one still masked adds the
  teacher's prediction to the divergence part.
- ``mcd-ceiling`` (reverse KL, the honest ceiling; docs/ceiling.md): the same optimum without oracle data.
  The data term's x^k is drawn from the *teacher's own* many-step continuation of z_t (ancestral steps of
  the ``continuation_steps``-step grid from t down to 0, temperature 1: what the teacher@N believes follows
  z_t), never from the exact chain, which the trained teacher never learned. And each position's estimate
  uses its own draw set: positions are split into ``groups`` classes by index mod ``groups``, each class
  with K independent continuations, so two positions closer than ``groups`` never read the same joint
  draws (shared draws correlate neighbours' predictions and leak the joint law into a factorised
  student: with K = 1 every position would copy one joint sample).
- ``sdtt-ideal``: SDTT's target for the same jump: the teacher's own ``sdtt_teacher_steps`` (2) ancestral
  steps of (t - s) / 2 from z_t (mcd_scale/distill/sdtt.py; no x is needed), K rollouts, normalised
  geometric mean of their targets.

The teacher is any Denoiser: the exact chain (:class:`ChainTeacher`) or a trained network. The grid is the
samplers' (``sampling_times(steps)``): the step a call belongs to is read from its t, so the ideal student
is sampled with the same sampler and step count as the students. The draws of a row are keyed by (purpose,
seed, step, a hash of the row's z_t): the ideal student is a deterministic function of (z_t, t), like a
network, whatever the batch. Calls at the final time (the sampler's tail, ~0.003 tokens per sample) have
no jump left: they return the teacher's prediction. float64 throughout.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch

from mcd_scale.diffusion.sampling import sampling_times
from mcd_scale.diffusion.schedules import Schedule
from mcd_scale.distill.ideal import forward_kl_optimum, reverse_kl_optimum, sdtt_optimum
from mcd_scale.distill.sdtt import sdtt_rollout
from mcd_scale.eval.chain_posterior import sample_posterior
from mcd_scale.rng import keyed_generator

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KINDS = ("mcd-ideal", "mcd-ideal-fkl", "sdtt-ideal", "mcd-ceiling")


class ChainTeacher:
    """The exact chain as a Denoiser: logits = exact log posterior marginals (float64), mask column -inf."""

    def __init__(self, chain, chunk: int = 16):
        self.chain, self.chunk = chain, chunk

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logp = self.chain.oracle_log_marginals(z.cpu(), chunk=self.chunk)
        return torch.cat([logp, torch.full_like(logp[..., :1], float("-inf"))], -1)


def _row_key(row: torch.Tensor) -> int:
    """A 63-bit integer from a row's token ids (its z_t): the key of that row's draws."""
    digest = hashlib.blake2b(row.to(torch.int64).numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class IdealStudent:
    """Denoiser(z [B, L], t [B]) -> logits [B, L, V+1] (float64): log q of ``kind``'s optimum at every
    position masked in z, a point mass elsewhere. See the module docstring."""

    def __init__(self, kind: str, chain, teacher: Denoiser, steps: int, schedule: Schedule, draws: int = 12,
                 seed: int = 0, teacher_temperature: float = 1.0, sdtt_teacher_steps: int = 2, chunk: int = 64,
                 groups: int = 3, continuation_steps: int = 64):
        if kind not in KINDS:
            raise ValueError(f"ideal student kind must be one of {list(KINDS)}, got {kind!r}")
        if draws < 1 or steps < 1 or teacher_temperature <= 0 or sdtt_teacher_steps < 1:
            raise ValueError(f"need draws >= 1, steps >= 1, teacher_temperature > 0, sdtt_teacher_steps >= 1; "
                             f"got {draws}, {steps}, {teacher_temperature}, {sdtt_teacher_steps}")
        if groups < 1 or continuation_steps < 1:
            raise ValueError(f"need groups >= 1 and continuation_steps >= 1; got {groups}, {continuation_steps}")
        self.groups, self.continuation_times = groups, sampling_times(continuation_steps)
        self.kind, self.chain, self.teacher = kind, chain, teacher
        self.schedule, self.draws, self.seed = schedule, draws, seed
        self.tau, self.sdtt_steps, self.chunk = float(teacher_temperature), sdtt_teacher_steps, chunk
        self.times = sampling_times(steps)
        self.V = chain.num_symbols

    def _step(self, t: torch.Tensor) -> int:
        """Index k of the grid time t (the sampler passes times[k] as float32)."""
        k = int(torch.argmin((self.times - float(t[0])).abs()))
        if abs(float(self.times[k]) - float(t[0])) > 1e-6:
            raise ValueError(f"t = {float(t[0])} is not a time of the {len(self.times) - 1}-step grid the ideal "
                             f"student was built for; sample it with the same step count")
        return k

    def _teacher_logp(self, z: torch.Tensor, t: float) -> torch.Tensor:
        logits = self.teacher(z, torch.full((z.shape[0],), t, dtype=torch.float32))
        return torch.log_softmax(logits[..., :self.V].double().cpu() / self.tau, -1)

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z = z.cpu()
        B, L = z.shape
        V, K = self.V, self.draws
        k = self._step(t)
        masked = z == V
        out = torch.full((B, L, V + 1), float("-inf"), dtype=torch.float64)
        out[~masked] = torch.nn.functional.one_hot(z[~masked], V + 1).double().log()
        if k == len(self.times) - 1:                       # the tail: no jump left (module docstring)
            out[..., :V][masked] = self._teacher_logp(z, float(self.times[k]))[masked]
            return out
        gens = [keyed_generator("ideal-student", self.seed, k, _row_key(z[b])) for b in range(B)]
        if self.kind == "sdtt-ideal":
            logq = self._sdtt(z, k, gens)
        elif self.kind == "mcd-ceiling":
            logq = self._ceiling(z, k, gens)
        else:
            logq = self._mcd(z, k, gens)
        out[..., :V][masked] = logq
        return out

    def _mcd(self, z: torch.Tensor, k: int, gens: list) -> torch.Tensor:
        """log q [n_masked, V] of the MCD optimum at the positions masked in z (row-major order)."""
        B, L = z.shape
        V, K = self.V, self.draws
        t, s = float(self.times[k]), float(self.times[k + 1])
        a_t, a_s = (float(a) for a in self.schedule.alpha(self.times[k:k + 2]))
        u_post = torch.stack([torch.rand(K, L, generator=g, dtype=torch.float64) for g in gens])
        u_reveal = torch.stack([torch.rand(K, L, generator=g, dtype=torch.float64) for g in gens])
        z_rep = z.repeat_interleave(K, 0)                                         # [B*K, L]
        x = sample_posterior(self.chain, z_rep, u_post.reshape(B * K, L), chunk=self.chunk)
        masked_t = z_rep == V
        reveal = masked_t & (u_reveal.reshape(B * K, L) < (a_s - a_t) / (1.0 - a_t))
        z_s = torch.where(reveal, x, z_rep)
        logp = self._teacher_logp(z_s, s).view(B, K, L, V).permute(0, 2, 1, 3)   # [B, L, K, V]
        counts = (torch.nn.functional.one_hot(x, V).double() * reveal.unsqueeze(-1)).view(B, K, L, V).sum(1)
        still = (masked_t & ~reveal).view(B, K, L).permute(0, 2, 1)              # [B, L, K]
        sel = z == V
        if self.kind == "mcd-ideal":
            # 50 bisection halvings of the [-750, 50] bracket: log q to ~1e-12, half the default's cost (the
            # solver is ~80% of a step's time)
            return reverse_kl_optimum(counts[sel], logp[sel], still[sel], iters=50)
        return forward_kl_optimum(counts[sel], logp[sel], still[sel])

    def _sdtt(self, z: torch.Tensor, k: int, gens: list) -> torch.Tensor:
        """log q [n_masked, V] of the SDTT optimum: K rollouts of the teacher's steps of (t - s) / n."""
        B, L = z.shape
        V, K = self.V, self.draws
        t, s = float(self.times[k]), float(self.times[k + 1])
        seeds = torch.stack([torch.randint(0, 2 ** 62, (K,), generator=g) for g in gens]).flatten()
        rollout_gens = [torch.Generator().manual_seed(int(v)) for v in seeds]
        z_rep = z.repeat_interleave(K, 0)

        def teacher(zz: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            # float32 like any network's logits: sdtt_rollout keeps its targets in float32 (the optimum
            # itself is computed in float64 from them)
            return self.teacher(zz, tt.float()).float().cpu()

        target = sdtt_rollout(teacher, z_rep, torch.full((B * K,), t, dtype=torch.float64),
                              (t - s) / self.sdtt_steps, schedule=self.schedule, vocab_size=V,
                              generators=rollout_gens, n_steps=self.sdtt_steps, temperature=self.tau,
                              t_floor=min(s, 1e-5)).target_logp
        target = target.view(B, K, L, V).permute(0, 2, 1, 3)                     # [B, L, K, V]
        return sdtt_optimum(target[z == V])

    def continuation(self, z: torch.Tensor, t: float, gens: list) -> torch.Tensor:
        """x [R, L]: the teacher's own ancestral continuation of each row of z (masked at time t) down to 0 on
        the continuation grid, temperature 1, one generator per row. A position's reveal time and its Gumbel
        noise are drawn up front (a masked position is still masked at s with probability
        (1 - alpha_s) / (1 - alpha_t)); the teacher is called only on grid steps where some row reveals."""
        R, L = z.shape
        V = self.V
        u = torch.stack([torch.rand(L, generator=g, dtype=torch.float64) for g in gens])            # [R, L]
        gumbel = torch.stack([-torch.log(-torch.log(torch.rand(L, V, generator=g, dtype=torch.float64)
                                                    .clamp(1e-300, 1 - 1e-16))) for g in gens])  # [R, L, V]
        a_t = float(self.schedule.alpha(torch.tensor([t], dtype=torch.float64))[0])
        grid = [float(x) for x in self.continuation_times if float(x) < t - 1e-12] + [0.0]
        x = z.clone()
        prev = t
        for s in grid:
            a_s = 1.0 if s == 0.0 else float(self.schedule.alpha(torch.tensor([s], dtype=torch.float64))[0])
            still = (1.0 - a_s) / max(1.0 - a_t, 1e-300)
            reveal = (x == V) & (u >= still)
            rows = reveal.any(-1).nonzero().flatten()
            if rows.numel():   # only the rows that reveal something: ~1 - 1/e of them per step at L = grid size
                sub = x[rows]
                logits = self.teacher(sub, torch.full((rows.numel(),), prev, dtype=torch.float32))
                draw = torch.argmax(torch.log_softmax(logits[..., :V].double().cpu(), -1) + gumbel[rows], -1)
                x[rows] = torch.where(reveal[rows], draw, sub)
            prev = s
        return x

    def _ceiling(self, z: torch.Tensor, k: int, gens: list) -> torch.Tensor:
        """log q [n_masked, V] of the reverse-KL optimum with teacher continuations as data and one
        independent draw set per position class (module docstring)."""
        B, L = z.shape
        V, K, G = self.V, self.draws, self.groups
        t, s = float(self.times[k]), float(self.times[k + 1])
        a_t, a_s = (float(a) for a in self.schedule.alpha(self.times[k:k + 2]))
        # row-major [B, G, K] draw sets, each with its own generator split off the row's keyed one
        sub = [torch.Generator().manual_seed(int(v)) for g in gens
               for v in torch.randint(0, 2 ** 62, (G * K,), generator=g)]
        z_rep = z.repeat_interleave(G * K, 0)                                     # [B*G*K, L]
        x = self.continuation(z_rep, t, sub)
        u_reveal = torch.stack([torch.rand(L, generator=g, dtype=torch.float64) for g in sub])
        masked_t = z_rep == V
        reveal = masked_t & (u_reveal < (a_s - a_t) / (1.0 - a_t))
        z_s = torch.where(reveal, x, z_rep)
        logp = self._teacher_logp(z_s, s).view(B, G, K, L, V)
        onehot = torch.nn.functional.one_hot(x, V).double() * reveal.unsqueeze(-1)
        counts_g = onehot.view(B, G, K, L, V).sum(2)                             # [B, G, L, V]
        still_g = (masked_t & ~reveal).view(B, G, K, L)
        cls = torch.arange(L) % G                                                 # each position's draw set
        pos = torch.arange(L)
        counts = counts_g[:, cls, pos]                                            # [B, L, V]
        logp_pos = logp.permute(0, 1, 3, 2, 4)[:, cls, pos]                       # [B, L, K, V]
        still = still_g.permute(0, 1, 3, 2)[:, cls, pos]                          # [B, L, K]
        sel = z == V
        return reverse_kl_optimum(counts[sel], logp_pos[sel], still[sel], iters=50)
