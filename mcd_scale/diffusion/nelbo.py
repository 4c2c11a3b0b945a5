"""The MDLM continuous-time NELBO (docs/method.md §2): a reference form and the vocab-parallel training form.

    NELBO = E_t [ (-alpha'_t / (1 - alpha_t)) * sum_{l: z_t^l = m} -log p_theta(x^l | z_t) ] / (B L)

The corruption (t, z_t, the per-token weights) is made on the data side; the training loss is a pure
function ``loss_fn(logits, labels)`` with ``labels = (x, weights)`` so it plugs into DeepSpeed's
pipeline engine, whose last stage only sees (logits, labels).

Vocab-parallel: each TP rank holds columns [r Vp/tp, (r+1) Vp/tp) of the ``padded_vocab`` (Vp) output
table. Columns >= V (the mask id V and the padding) are excluded (SUBS: mask logit -> -inf), so the
log-softmax runs over the V real tokens exactly as :func:`subs_log_probs` does on gathered logits.
At positions that are not masked the weight is 0, so SUBS carry-over needs no special case.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from mcd_scale.parallel import collectives

from mcd_scale.diffusion.schedules import Schedule
from mcd_scale.diffusion.subs import subs_log_probs
from mcd_scale.diffusion.masking import mask_tokens, sample_times


# --------------------------------------------------------------------------------------------
# Data side
# --------------------------------------------------------------------------------------------
def nelbo_token_weights(z_t: torch.Tensor, t: torch.Tensor, schedule: Schedule, mask_id: int) -> torch.Tensor:
    """Per-token NELBO weights (float32 [B, L]): -alpha'_t / (1 - alpha_t) where z_t = m, else 0."""
    w = schedule.weight(t.to(torch.float64)).to(torch.float32)
    return torch.where(z_t == mask_id, w.unsqueeze(1), torch.zeros((), dtype=torch.float32))


def make_mdlm_labels(x: torch.Tensor, sample_ids: torch.Tensor, positions: torch.Tensor, global_batch: int,
                     step: int, seed: int, schedule: Schedule, mask_id: int, t_min: float = 1e-3,
                     antithetic: bool = True) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Corrupt a micro-batch on the data side: returns ``(z_t, t, labels)`` with ``labels = (x, weights)``.

    positions: each sample's position in the global batch (for antithetic times);
    sample_ids: global dataset ids (the masking RNG key). See masking.py for the draws.
    """
    t = sample_times(positions, global_batch, step, seed, t_min=t_min, antithetic=antithetic)
    z_t = mask_tokens(x, t, sample_ids, step, seed, schedule, mask_id)
    return z_t, t, (x, nelbo_token_weights(z_t, t, schedule, mask_id))


# --------------------------------------------------------------------------------------------
# Reference (gathered, full-vocabulary logits)
# --------------------------------------------------------------------------------------------
def nelbo_loss_reference(logits_full: torch.Tensor, x: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor,
                         schedule: Schedule, vocab_size: int) -> torch.Tensor:
    """The straightforward NELBO on full logits [B, L, >= V+1]: SUBS log-softmax, weighted -log p(x) over
    masked tokens, summed and divided by B*L."""
    mask_id = vocab_size
    logp = subs_log_probs(logits_full, z_t, vocab_size, carry_over=False)
    nll = -logp.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    w = schedule.weight(t.to(logp.dtype)).unsqueeze(1).expand_as(nll)
    masked = z_t == mask_id
    return torch.where(masked, w * nll, torch.zeros_like(nll)).sum() / x.numel()


# --------------------------------------------------------------------------------------------
# Vocab-parallel cross-entropy with the SUBS column exclusion
# --------------------------------------------------------------------------------------------
def _all_reduce(t: torch.Tensor, op: str, group) -> None:
    if group is not None:
        collectives.all_reduce_(t, op, group=group)


class _VocabParallelSubsCE(torch.autograd.Function):
    """-log softmax(logits over the real columns)[target], logits split over the TP group.

    Same algorithm as megatron-core's ``vocab_parallel_cross_entropy`` (max / sum-exp / target logit
    all-reduced in forward, purely local backward since the loss is replicated over TP ranks), with two
    differences: the group is explicit (no hidden global state), and columns outside [0, V) are
    excluded inside the kernel so no extra masked copy of the logits is kept. The caller's logits are
    never modified (megatron's version subtracts the max in place on fp32 inputs).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_size: int, group):
        shard = logits.shape[-1]
        # One float32 working copy, later turned into the softmax saved for backward.
        work = logits.float().clone() if logits.dtype == torch.float32 else logits.float()
        n_real = max(0, min(shard, vocab_size - vocab_start))  # real columns in this shard
        if n_real < shard:
            work[..., n_real:] = float("-inf")
        logits_max = work.max(dim=-1).values if n_real > 0 else work.new_full(work.shape[:-1], float("-inf"))
        _all_reduce(logits_max, "max", group)
        work.sub_(logits_max.unsqueeze(-1))

        local_target = target - vocab_start
        in_shard = (local_target >= 0) & (local_target < n_real)
        idx = torch.where(in_shard, local_target, torch.zeros_like(local_target))
        target_logit = work.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(in_shard, target_logit, torch.zeros_like(target_logit))
        _all_reduce(target_logit, "sum", group)

        work.exp_()  # exp(-inf) = 0: excluded columns carry no mass
        sum_exp = work.sum(dim=-1)
        _all_reduce(sum_exp, "sum", group)
        loss = torch.log(sum_exp) - target_logit
        work.div_(sum_exp.unsqueeze(-1))  # now the softmax
        ctx.save_for_backward(work, idx, in_shard)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, idx, in_shard = ctx.saved_tensors
        grad = softmax.clone() if ctx.needs_input_grad[0] else None
        if grad is None:
            return None, None, None, None, None
        grad.scatter_add_(-1, idx.unsqueeze(-1), -in_shard.to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def _resolve_group(tp_size: int, group):
    if tp_size == 1:
        return None  # no collective: works without torch.distributed
    if group is None:
        # lazy: loads megatron; importing this module does not need it
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group()
    got = torch.distributed.get_world_size(group)
    if got != tp_size:
        raise ValueError(f"tp_size={tp_size} but the tensor-parallel group has {got} ranks")
    return group


def vocab_parallel_subs_nll(logits_shard: torch.Tensor, target: torch.Tensor, vocab_size: int,
                            padded_vocab: int, tp_rank: int, tp_size: int, group=None) -> torch.Tensor:
    """Per-token -log p(target) (float32, shape of ``target``) from vocab-parallel logits.

    logits_shard: [..., padded_vocab / tp_size], the columns of rank ``tp_rank``. ``group``: the TP
    process group (default: megatron-core's parallel_state TP group; unused when tp_size == 1).
    """
    if padded_vocab % tp_size != 0:
        raise ValueError(f"padded_vocab {padded_vocab} not divisible by tp_size {tp_size}")
    shard = padded_vocab // tp_size
    if logits_shard.shape[-1] != shard:
        raise ValueError(f"logits last dim {logits_shard.shape[-1]} != padded_vocab/tp = {shard}")
    if logits_shard.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits_shard.shape)} and target {tuple(target.shape)} disagree")
    if not 0 < vocab_size < padded_vocab:
        raise ValueError(f"need 0 < vocab_size ({vocab_size}) < padded_vocab ({padded_vocab}): the mask id "
                         f"V must have a column")
    return _VocabParallelSubsCE.apply(logits_shard, target, tp_rank * shard, vocab_size,
                                      _resolve_group(tp_size, group))


def nelbo_loss_vocab_parallel(logits_shard: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                              vocab_size: int, padded_vocab: int, tp_rank: int, tp_size: int,
                              group=None) -> torch.Tensor:
    """mean over B*L of weights * CE(x) on vocab-parallel logits [B, L, Vp/tp] (replicated over TP)."""
    nll = vocab_parallel_subs_nll(logits_shard, x, vocab_size, padded_vocab, tp_rank, tp_size, group)
    return (weights.to(nll.dtype) * nll).sum() / x.numel()


@dataclass(frozen=True)
class MdlmLoss:
    """DeepSpeed ``loss_fn(logits, labels)`` for the MDLM NELBO; ``labels = (x, weights)``.

    Build it per rank: ``MdlmLoss(V, Vp, dims.tp_rank, dims.tp, dims.tp_group)``.
    """
    vocab_size: int
    padded_vocab: int
    tp_rank: int = 0
    tp_size: int = 1
    group: Optional[object] = field(default=None, compare=False)

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, weights = labels
        return nelbo_loss_vocab_parallel(logits, x, weights, self.vocab_size, self.padded_vocab,
                                         self.tp_rank, self.tp_size, self.group)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
@dataclass
class NelboMeter:
    """Accumulates the validation NELBO: sum of weighted masked-token NLL and the token count.

    The per-token NELBO is ``total / tokens``; ``exp`` of it upper-bounds the perplexity. Sum across
    data-parallel ranks by all-reducing :meth:`as_tensor` before reading.
    """
    total: float = 0.0
    tokens: int = 0

    def update(self, nll: torch.Tensor, weights: torch.Tensor) -> None:
        self.total += float((weights.double() * nll.double()).sum())
        self.tokens += int(weights.numel())

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.total, float(self.tokens)], dtype=torch.float64)

    @property
    def per_token(self) -> float:
        if self.tokens == 0:
            raise ValueError("NelboMeter is empty: no validation tokens were seen")
        return self.total / self.tokens

    @property
    def perplexity(self) -> float:
        return perplexity_bound(self.per_token)


def perplexity_bound(nelbo_per_token: float) -> float:
    """exp(NELBO per token): an upper bound on the model's perplexity (nats in, inf on overflow)."""
    return math.exp(nelbo_per_token) if nelbo_per_token < 709.0 else math.inf
