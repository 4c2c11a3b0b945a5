"""The stochastic baseline MCD is compared with: SDTT-style self-distillation (docs/method.md section 5b).

From z_t (x masked independently at t, no coupling) the frozen teacher runs ``n_steps`` of its own
ancestral steps of size dt: t_0 = t, t_{i+1} = max(t_i - dt, t_floor). At step i it predicts
p_i = softmax(logits[..., :V] / tau) on the current z_i; each still-masked token is revealed with
probability (alpha_{t_{i+1}} - alpha_{t_i}) / (1 - alpha_{t_i}) and, if revealed, takes a value drawn
from p_i. The target of a token revealed at step i is p_i (the distribution its value was drawn
from); tokens still masked after the last step take the last prediction p_{n-1} (no extra teacher
call). The student predicts once on z_t; the loss is KL(p_S || target) on every token masked at t,
summed and divided by B*L like the MCD loss.

Randomness comes only from the caller's generators, one per sample (keyed by (purpose, seed, sample
id, step) with :func:`mcd_scale.rng.keyed_generator`), so a sample's targets do not depend on its
batch neighbours or the rank that computed them. Draws happen on each generator's device; the same
keys give the same numbers on the same device type (CPU and CUDA streams differ).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from mcd_scale.diffusion.schedules import Schedule
from mcd_scale.distill.loss import reverse_kl_full, student_log_probs
from mcd_scale.distill.targets import full_from_logits

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SDTTRollout:
    """What the teacher's rollout produced (targets plus the bookkeeping useful for stats/tests).

    target_logp: float32 [B, L, V]; at tokens revealed at t it is the carry-over point mass on z_t.
    z_final: [B, L] ids after the teacher's steps.
    reveal_step: int64 [B, L]; -1 revealed at t, i in [0, n) revealed at step i, n still masked.
    times: float64 [n + 1, B], the times t_0 .. t_n.
    """
    target_logp: torch.Tensor
    z_final: torch.Tensor
    reveal_step: torch.Tensor
    times: torch.Tensor


def _step_times(t: torch.Tensor, dt: float, n_steps: int, t_floor: float) -> torch.Tensor:
    steps = torch.arange(n_steps + 1, dtype=torch.float64, device=t.device).unsqueeze(-1)
    return (t.double().unsqueeze(0) - steps * dt).clamp(min=t_floor)


@torch.no_grad()
def sdtt_rollout(teacher_denoiser: Denoiser, z_t: torch.Tensor, t: torch.Tensor, dt: float, *,
                 schedule: Schedule, vocab_size: int, generators: Sequence[torch.Generator],
                 n_steps: int = 2, temperature: float = 1.0, mask_id: Optional[int] = None,
                 t_floor: float = 1e-5) -> SDTTRollout:
    """Run the teacher's ``n_steps`` stochastic steps from (z_t, t); see the module docstring.

    teacher_denoiser(z [B, L], t [B]) -> logits [B, L, >= V+1] (a FrozenTeacher or any no-grad callable).
    t: [B] per-sample times (a scalar is broadcast). generators: one per sample.
    """
    batch, seq_len = z_t.shape
    if mask_id is not None and mask_id != vocab_size:
        raise ValueError(f"mask_id {mask_id} != vocab_size {vocab_size}: the project's convention is mask id = V.")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps} (config 'distill.sdtt_teacher_steps').")
    if not 0.0 < dt < 1.0:
        raise ValueError(f"dt must be in (0, 1), got {dt}.")
    if len(generators) != batch:
        raise ValueError(f"need one generator per sample: got {len(generators)} for a batch of {batch}.")
    t = t.expand(batch) if t.dim() == 0 else t
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or [B] = [{batch}], got {tuple(t.shape)}.")

    times = _step_times(t, dt, n_steps, t_floor)  # [n+1, B]
    alpha = schedule.alpha(times)
    reveal_prob = ((alpha[1:] - alpha[:-1]) / (1.0 - alpha[:-1])).clamp(0.0, 1.0)  # [n, B]

    z = z_t.clone()
    masked_t = z_t == vocab_size
    # Carry-over point mass at tokens already revealed at t; every masked one is overwritten below.
    target = torch.full((batch, seq_len, vocab_size), float("-inf"), device=z_t.device)
    target.scatter_(-1, z_t.clamp(max=vocab_size - 1).unsqueeze(-1), 0.0)
    reveal_step = torch.where(masked_t, n_steps, -1).to(torch.int64)
    logp = target
    for i in range(n_steps):
        logits = teacher_denoiser(z, times[i].to(t.dtype))
        logp = full_from_logits(logits, vocab_size, temperature)
        still = z == vocab_size
        for b, gen in enumerate(generators):
            u = torch.rand(seq_len, generator=gen, dtype=torch.float64, device=gen.device)
            reveal = still[b] & (u < reveal_prob[i, b]).to(z.device)
            if not reveal.any():
                continue
            probs = logp[b, reveal].double().exp().to(gen.device)
            values = torch.multinomial(probs, 1, generator=gen).squeeze(-1).to(z.device)
            z[b, reveal] = values
            target[b, reveal] = logp[b, reveal]
            reveal_step[b, reveal] = i
    left = z == vocab_size
    target[left] = logp[left]
    return SDTTRollout(target, z, reveal_step, times)


def sdtt_targets(teacher_denoiser: Denoiser, z_t: torch.Tensor, t: torch.Tensor, dt: float, *,
                 schedule: Schedule, vocab_size: int, generators: Sequence[torch.Generator],
                 n_steps: int = 2, temperature: float = 1.0, mask_id: Optional[int] = None,
                 t_floor: float = 1e-5) -> torch.Tensor:
    """The SDTT target log-probs [B, L, V] (float32): :func:`sdtt_rollout`'s ``target_logp``."""
    return sdtt_rollout(teacher_denoiser, z_t, t, dt, schedule=schedule, vocab_size=vocab_size,
                        generators=generators, n_steps=n_steps, temperature=temperature, mask_id=mask_id,
                        t_floor=t_floor).target_logp


def sdtt_loss(student_logits: torch.Tensor, z_t: torch.Tensor, target_logp: torch.Tensor,
              vocab_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL(p_S || target) summed over the tokens masked at t, divided by B*L (revealed tokens: 0).

    Returns (loss, stats) with stats 'kl_per_token' (mean over masked tokens), 'n_masked', 'n_tokens'.
    """
    if target_logp.shape != (*z_t.shape, vocab_size):
        raise ValueError(f"target_logp must be [B, L, V] = {(*z_t.shape, vocab_size)}, got {tuple(target_logp.shape)}.")
    masked = z_t == vocab_size
    per_row = reverse_kl_full(student_log_probs(student_logits[masked], vocab_size), target_logp[masked])
    kl_sum = per_row.sum()
    n_masked = masked.sum()
    loss = kl_sum / z_t.numel()
    stats = {"kl_per_token": kl_sum.detach() / n_masked.clamp(min=1), "n_masked": n_masked,
             "n_tokens": torch.tensor(z_t.numel(), device=z_t.device)}
    return loss, stats
