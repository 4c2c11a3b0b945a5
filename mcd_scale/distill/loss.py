"""The Masked Consistency Distillation loss (docs/distill.md, design docs/method.md section 5).

Given a clean x and a coupled pair (z_t, z_s) with s < t (every token masked at s is masked at t),
the student sees z_t and the frozen teacher's target describes z_s. Per token:

* revealed at t (z_t = x):                0 (SUBS carry-over: nothing to learn);
* masked at t, revealed at s (z_s = x):  -log p_S(x)  (the teacher is a point mass on x there);
* masked at t and at s:                   D(p_S, p_T) with D = KL(p_S || p_T) (reverse, default) or
                                          KL(p_T || p_S) (forward).

The loss is the SUM over all tokens divided by the number of tokens B*L (not by the number of
masked tokens): every token then weighs the same whatever the batch's masking rate, as in MDLM's
per-token NELBO, and the per-rank means of equal-sized data-parallel batches average to the global one.

With :class:`~mcd_scale.distill.targets.TopKTargets` (offline) the teacher is known only on its
top-k ids K plus a tail mass T. Two models of the unknown tail (``topk_tail``):

* 'bucket' (default): the tail is one outcome; the divergence is the exact KL between the coarsened
  (k + 1)-outcome distributions, equivalently the exact KL if the teacher's tail had the student's shape:

    reverse:  sum_{v in K} p_S(v) (log p_S(v) - log q_v) + P_S(rest) (log P_S(rest) - log T)
    forward:  sum_{v in K} q_v (log q_v - log p_S(v))   + T (log T - log P_S(rest))

  A lower bound on the exact KL (data processing); zero, with zero gradient, at p_S = p_T.
* 'uniform' (reverse KL only): the tail is spread uniformly, q_v = T / (V - k) for v not in K:

    reverse:  sum_v p_S log p_S - sum_{v in K} p_S(v) log q_v - P_S(rest) log(T / (V - k))

  This equals the bucket form + P_S(rest) KL(p_S|rest || uniform), a pull of the student's tail
  towards uniform that does NOT vanish at p_S = p_T: the teacher is not a minimiser. Measured on a
  V = 4096 random teacher with top-64 mass 0.77, the loss is 2-10x the exact value and the gradient
  at p_S = p_T has norm ~1 instead of ~0 (docs/distill.md). Kept for comparison only.

P_S(rest) = sum_{v not in K} p_S(v) is computed as a log-sum-exp (never 1 - sum, which cancels).
For k = V the rest is empty and every form reduces to the exact divergence. All math is float32
(float64 if the inputs are float64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from mcd_scale.distill.targets import TopKTargets

Target = Union[torch.Tensor, TopKTargets, "DenseTopK"]
DIVERGENCES = ("reverse_kl", "forward_kl")
TAIL_MODELS = ("bucket", "uniform")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def student_log_probs(student_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """SUBS log-probs over the V real tokens (mask + padding columns dropped), float32 or float64."""
    if student_logits.shape[-1] < vocab_size + 1:
        raise ValueError(f"student logits have {student_logits.shape[-1]} columns; expected >= vocab_size + 1 "
                         f"= {vocab_size + 1}. Gather tensor-parallel vocabulary shards before the loss.")
    return torch.log_softmax(_upcast(student_logits[..., :vocab_size]), dim=-1)


# ------------------------------------------------------------------------------------------------
# Per-row divergences. logp_s: [N, V] student log-probs (carries the gradient); teacher: constant.
# ------------------------------------------------------------------------------------------------
def reverse_kl_full(logp_s: torch.Tensor, logp_t: torch.Tensor) -> torch.Tensor:
    """KL(p_S || p_T) per row [N]. Infinite where the teacher has zero mass and the student does not,
    as the divergence is; finite logits never produce that."""
    p_s = logp_s.exp()
    return (p_s * (logp_s - logp_t.to(logp_s.dtype))).sum(-1)


def forward_kl_full(logp_s: torch.Tensor, logp_t: torch.Tensor) -> torch.Tensor:
    """KL(p_T || p_S) per row [N]; teacher entries with zero mass contribute 0 (0 log 0 = 0)."""
    logp_t = logp_t.to(logp_s.dtype)
    p_t = logp_t.exp()
    # Clamp only the constant teacher side: 0 * (-inf) would be NaN, and 0 * finite is the 0 we want.
    logp_t_safe = logp_t.clamp(min=torch.finfo(logp_t.dtype).min)
    return (p_t * (logp_t_safe - logp_s)).sum(-1)


def _renormalised(target: TopKTargets, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q on the top-k ids, log tail mass), renormalised so top-k + tail sum to exactly 1.

    Stored log-probs are float16 in shards; their rounding leaves a total mass of 1 +- ~1e-3, which
    would make the "KL" slightly negative-capable and biased. Renormalising removes that; for
    float32 targets the correction is ~1e-7.
    """
    logq = target.logp.to(dtype)
    tail = target.tail_logp.to(dtype)
    log_z = torch.logsumexp(torch.cat([logq, tail.unsqueeze(-1)], dim=-1), dim=-1)
    return logq - log_z.unsqueeze(-1), tail - log_z


def _student_rest(logp_s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log P_S(rest) = log sum of the student's probabilities outside ``ids`` (per row)."""
    return torch.logsumexp(logp_s.scatter(-1, ids, float("-inf")), dim=-1)


def reverse_kl_topk(logp_s: torch.Tensor, target: TopKTargets, tail_model: str = "bucket") -> torch.Tensor:
    """KL(p_S || q) per row [N] for a top-k + tail teacher q (tail model: see the module docstring)."""
    ids = target.ids.long()
    logq, tail = _renormalised(target, logp_s.dtype)
    logp_s_k = logp_s.gather(-1, ids)
    rest = target.vocab_size - target.k
    if tail_model == "bucket":
        kl = (logp_s_k.exp() * (logp_s_k - logq)).sum(-1)
        if rest > 0:
            log_rest = _student_rest(logp_s, ids)
            kl = kl + log_rest.exp() * (log_rest - tail)
        return kl
    if tail_model == "uniform":
        neg_entropy = (logp_s.exp() * logp_s).sum(-1)
        cross = (logp_s_k.exp() * logq).sum(-1)
        if rest > 0:
            cross = cross + _student_rest(logp_s, ids).exp() * (tail - math.log(rest))
        return neg_entropy - cross
    raise ValueError(f"top-k tail model {tail_model!r} is not one of {TAIL_MODELS}.")


def forward_kl_topk(logp_s: torch.Tensor, target: TopKTargets) -> torch.Tensor:
    """KL(q || p_S) per row with the tail as one bucket (student's bucket = its mass outside top-k)."""
    ids = target.ids.long()
    logq, tail = _renormalised(target, logp_s.dtype)
    kl = (logq.exp() * (logq - logp_s.gather(-1, ids))).sum(-1)
    if target.vocab_size > target.k:
        tail_mass = tail.exp()
        bucket = tail_mass * (tail - _student_rest(logp_s, ids))
        # tail_mass == 0 (tail = -inf) means an empty bucket: 0 log 0 = 0, not NaN.
        kl = kl + torch.where(tail_mass > 0, bucket, torch.zeros_like(bucket))
    return kl


# ------------------------------------------------------------------------------------------------
# Dense top-k targets (offline MCD in the training loop: one row per position, no boolean indexing)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DenseTopK:
    """Top-k teacher at every position [B, L, k] (the trajectory shards' layout); rows outside the positions
    masked at s are ignored by :func:`mcd_loss`. Same attributes as :class:`TopKTargets` that the per-row
    divergences read (ids, logp, tail_logp, vocab_size, k)."""

    ids: torch.Tensor  # int [B, L, k]
    logp: torch.Tensor  # float [B, L, k]
    tail_logp: torch.Tensor  # float [B, L]
    vocab_size: int

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    def to(self, device) -> "DenseTopK":
        return DenseTopK(self.ids.to(device), self.logp.to(device), self.tail_logp.to(device), self.vocab_size)

    @classmethod
    def from_rows(cls, rows: TopKTargets, positions: torch.Tensor) -> "DenseTopK":
        """Scatter a row-per-masked-position :class:`TopKTargets` to [B, L, k] (used outside the step path)."""
        shape = (*positions.shape, rows.k)
        ids = torch.zeros(shape, dtype=rows.ids.dtype, device=rows.ids.device)
        logp = torch.zeros(shape, dtype=rows.logp.dtype, device=rows.logp.device)
        tail = torch.zeros(positions.shape, dtype=rows.tail_logp.dtype, device=rows.tail_logp.device)
        ids[positions], logp[positions], tail[positions] = rows.ids, rows.logp, rows.tail_logp
        return cls(ids, logp, tail, rows.vocab_size)

    def finite_outside(self, positions: torch.Tensor) -> "DenseTopK":
        """Ids in range and a uniform (k + 1)-outcome teacher at rows outside ``positions``: every row's
        divergence is then finite, so masking it out also masks its gradient."""
        k = self.k
        fill = -math.log(k + 1)
        keep = positions.unsqueeze(-1)
        ids = torch.where(keep, self.ids, torch.arange(k, device=self.ids.device, dtype=self.ids.dtype))
        logp = torch.where(keep, self.logp, torch.full_like(self.logp, fill))
        tail = torch.where(positions, self.tail_logp, torch.full_like(self.tail_logp, fill))
        return DenseTopK(ids, logp, tail, self.vocab_size)


# ------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------
def _validate_pair(x: torch.Tensor, z_t: torch.Tensor, z_s: torch.Tensor, mask_id: int) -> None:
    if not (x.shape == z_t.shape == z_s.shape) or x.dim() != 2:
        raise ValueError(f"x, z_t, z_s must all be [B, L]; got {tuple(x.shape)}, {tuple(z_t.shape)}, "
                         f"{tuple(z_s.shape)}.")
    masked_t, masked_s = z_t == mask_id, z_s == mask_id
    if (masked_s & ~masked_t).any():
        raise ValueError("z_s masks a token that z_t reveals: (z_t, z_s) is not a coupled pair with s < t "
                         "(the masked set at s must be contained in the masked set at t).")
    if ((z_t != x) & ~masked_t).any() or ((z_s != x) & ~masked_s).any():
        raise ValueError("a revealed token of z_t or z_s differs from x: the pair was not built from this x.")


def mcd_loss(student_logits: torch.Tensor, x: torch.Tensor, z_t: torch.Tensor, z_s: torch.Tensor,
             target: Target, vocab_size: int, divergence: str = "reverse_kl",
             topk_tail: str = "bucket", validate: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MCD loss: CE on tokens revealed between t and s, divergence on tokens masked at both.

    Args:
        student_logits: [B, L, >= V+1] student output on z_t (full vocabulary, any float dtype).
        x: [B, L] clean ids; z_t, z_s: [B, L] coupled noisy ids (mask id = vocab_size), s < t.
        target: the teacher on z_s — a [B, L, V] log-prob tensor (online, :func:`full_from_logits`),
            :class:`TopKTargets` whose positions are exactly the tokens masked at s, or :class:`DenseTopK`
            (offline; rows outside the tokens masked at s are ignored).
        divergence: 'reverse_kl' (KL(p_S || p_T)) or 'forward_kl' (KL(p_T || p_S)).
        topk_tail: tail model for a top-k target with reverse KL, 'bucket' or 'uniform' (the forward KL
            always uses the bucket); ignored for a full target.
        validate: check the coupling and the top-k positions (host syncs: tests and debug runs only; the
            training loop passes ``MCD_DEBUG_CHECKS=1`` through, see mcd_scale/distill/objective.py).

    Returns:
        loss: scalar, (sum of CE + sum of divergences) / (B * L).
        stats (detached): 'ce' and 'kl' (their parts of the loss), 'ce_per_token' and 'kl_per_token'
            (means over their own tokens), 'n_revealed_t', 'n_ce', 'n_kl', 'n_tokens'.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence {divergence!r} is not one of {DIVERGENCES} (config 'distill.divergence').")
    mask_id = vocab_size
    if validate:
        _validate_pair(x, z_t, z_s, mask_id)
    masked_t, masked_s = z_t == mask_id, z_s == mask_id
    ce_mask = masked_t & ~masked_s
    kl_mask = masked_s  # contained in masked_t for a coupled pair
    # Masked arithmetic over every position (no boolean-mask indexing: its output size is data-dependent, a
    # host sync on a GPU). Inputs at positions a term ignores are made finite first, so the torch.where that
    # drops them also drops their gradient (a where over an inf/NaN branch would back-propagate 0 x inf = NaN).
    logp_s = student_log_probs(student_logits, vocab_size)  # [B, L, V]
    x_idx = x.long().clamp(0, vocab_size - 1).unsqueeze(-1)
    ce_tok = -logp_s.gather(-1, x_idx).squeeze(-1)
    ce_sum = torch.where(ce_mask, ce_tok, torch.zeros_like(ce_tok)).sum()

    if isinstance(target, (TopKTargets, DenseTopK)):
        if target.vocab_size != vocab_size:
            raise ValueError(f"top-k targets built for vocab_size {target.vocab_size}, loss called with {vocab_size}.")
        if isinstance(target, TopKTargets):  # rows of the masked positions only: scatter them to [B, L, k]
            if validate and (target.positions.shape != kl_mask.shape
                             or not torch.equal(target.positions.to(kl_mask.device), kl_mask)):
                raise ValueError("TopKTargets.positions differ from the tokens masked in z_s: the targets were "
                                 "computed for another z_s (wrong shard record, seed or (t, s)).")
            target = DenseTopK.from_rows(target.to(logp_s.device), kl_mask)
        target = target.to(logp_s.device).finite_outside(kl_mask)
        if divergence == "reverse_kl":
            per_tok = reverse_kl_topk(logp_s, target, topk_tail)
        else:
            per_tok = forward_kl_topk(logp_s, target)
    else:
        if target.shape != (*z_s.shape, vocab_size):
            raise ValueError(f"full target must be [B, L, V] = {(*z_s.shape, vocab_size)}, got {tuple(target.shape)}.")
        # Outside kl_mask the teacher is replaced by the student itself (a finite, zero divergence).
        logp_t = torch.where(kl_mask.unsqueeze(-1), target.to(logp_s.dtype), logp_s.detach())
        per_tok = reverse_kl_full(logp_s, logp_t) if divergence == "reverse_kl" else forward_kl_full(logp_s, logp_t)
    kl_sum = torch.where(kl_mask, per_tok, torch.zeros_like(per_tok)).sum()

    n_tokens = z_t.numel()
    loss = (ce_sum + kl_sum) / n_tokens
    n_ce, n_kl = ce_mask.sum(), kl_mask.sum()
    stats = {
        "ce": ce_sum.detach() / n_tokens,
        "kl": kl_sum.detach() / n_tokens,
        "ce_per_token": ce_sum.detach() / n_ce.clamp(min=1),
        "kl_per_token": kl_sum.detach() / n_kl.clamp(min=1),
        "n_revealed_t": (~masked_t).sum(),
        "n_ce": n_ce,
        "n_kl": n_kl,
        "n_tokens": torch.tensor(n_tokens, device=z_t.device),
    }
    return loss, stats
