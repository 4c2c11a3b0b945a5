"""Teacher targets for MCD: the exact (online) form and the top-k + tail (offline) form.

The teacher's target distribution at a position masked at s is

    log p_T = log_softmax(teacher_logits[..., :V] / tau)

(SUBS without carry-over: mask and padding columns are dropped; only positions masked at s are ever
used, so carry-over never matters here).

* Online (``teacher_mode: online``): :func:`full_from_logits` keeps all V log-probabilities.
* Offline (``teacher_mode: offline``): the precompute job cannot store [L, V] floats per sample, so
  :func:`topk_from_logits` keeps, at each position masked at s, the k largest log-probabilities and
  their ids plus ``tail_logp = log(1 - sum of the top-k probabilities)``, the mass of everything else.
  The loss spreads that tail uniformly over the V - k other ids (see :mod:`mcd_scale.distill.loss`).

Rows of a :class:`TopKTargets` are the positions with ``positions[b, l]`` true, in row-major (b, l)
order, i.e. the order of ``tensor[positions]``. :func:`pack_sample` / :func:`unpack_samples` convert
one sample's rows to and from compact numpy arrays (what a trajectory shard stores).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

#: Keys of one packed sample (see :func:`pack_sample`).
PACKED_KEYS = ("topk_pos", "topk_ids", "topk_logp", "tail_logp")


@dataclass
class TopKTargets:
    """Top-k teacher log-probabilities at the positions masked at s.

    Attributes:
        ids: int32 [N, k] token ids, sorted by decreasing teacher probability.
        logp: float16 or float32 [N, k] teacher log-probabilities of ``ids`` (at temperature tau).
        tail_logp: float32 [N] (float64 with float64 logp) log of the mass outside the top-k;
            -inf when there is none (k = V).
        positions: bool [B, L]; row i of ids/logp/tail_logp is the i-th True entry in row-major order.
        vocab_size: V, the number of real tokens (needed for the tail's V - k ids).
    """

    ids: torch.Tensor
    logp: torch.Tensor
    tail_logp: torch.Tensor
    positions: torch.Tensor
    vocab_size: int

    def __post_init__(self) -> None:
        n = int(self.positions.sum())
        if self.positions.dtype != torch.bool or self.positions.dim() != 2:
            raise ValueError(f"TopKTargets.positions must be a bool [B, L] tensor, got "
                             f"{self.positions.dtype} {tuple(self.positions.shape)}.")
        if self.ids.dim() != 2 or self.ids.shape != self.logp.shape:
            raise ValueError(f"TopKTargets.ids {tuple(self.ids.shape)} and .logp {tuple(self.logp.shape)} "
                             f"must both be [N, k].")
        if self.ids.shape[0] != n or tuple(self.tail_logp.shape) != (n,):
            raise ValueError(f"TopKTargets has {self.ids.shape[0]} rows and tail_logp of shape "
                             f"{tuple(self.tail_logp.shape)}, but positions selects {n} tokens.")
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"TopKTargets.k = {self.k} must be in [1, vocab_size = {self.vocab_size}].")

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def to(self, device: torch.device | str) -> "TopKTargets":
        """A copy on ``device`` (dtypes unchanged)."""
        return TopKTargets(self.ids.to(device), self.logp.to(device), self.tail_logp.to(device),
                           self.positions.to(device), self.vocab_size)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0.0:
        raise ValueError(f"teacher temperature must be > 0, got {temperature} "
                         f"(use 1.0 to disable; config 'distill.temperature').")


def full_from_logits(teacher_logits: torch.Tensor, vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    """The exact (online) target: float32 log-probs [B, L, V] = log_softmax(logits[..., :V] / tau).

    Half-precision logits are upcast first: a float16 log-softmax would lose the small
    probabilities the KL terms need.
    """
    _check_temperature(temperature)
    if teacher_logits.shape[-1] < vocab_size + 1:
        raise ValueError(f"teacher logits have {teacher_logits.shape[-1]} columns; expected >= vocab_size + 1 "
                         f"= {vocab_size + 1} (real tokens + mask).")
    real = teacher_logits[..., :vocab_size]
    real = real if real.dtype == torch.float64 else real.float()
    return torch.log_softmax(real / temperature, dim=-1)


def topk_from_logits(teacher_logits: torch.Tensor, z_s: torch.Tensor, vocab_size: int, k: int,
                     temperature: float = 1.0, logp_dtype: torch.dtype = torch.float32) -> TopKTargets:
    """Top-k teacher log-probs (+ tail mass) at the positions masked at s (``z_s == vocab_size``).

    teacher_logits: [B, L, >= V+1] (the teacher run on z_s); z_s: [B, L] ids with mask id V.
    ``tail_logp`` is computed as a log-sum-exp over the non-top-k entries rather than
    ``log(1 - sum(topk))``: the subtraction cancels catastrophically when the top-k hold almost all
    the mass, exactly the peaked case that matters.
    """
    if not 1 <= k <= vocab_size:
        raise ValueError(f"top_k = {k} must be in [1, vocab_size = {vocab_size}] (config 'distill.top_k').")
    if z_s.shape != teacher_logits.shape[:-1]:
        raise ValueError(f"z_s {tuple(z_s.shape)} does not match teacher logits {tuple(teacher_logits.shape)}.")
    positions = z_s == vocab_size
    logp_all = full_from_logits(teacher_logits[positions], vocab_size, temperature)  # [N, V]
    top_logp, top_ids = torch.topk(logp_all, k, dim=-1)
    rest = logp_all.scatter(-1, top_ids, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1)  # -inf exactly when k = V
    tail_dtype = torch.float64 if logp_dtype == torch.float64 else torch.float32
    return TopKTargets(top_ids.to(torch.int32), top_logp.to(logp_dtype), tail.to(tail_dtype), positions, vocab_size)


# ------------------------------------------------------------------------------------------------
# Per-sample packing for trajectory shards
# ------------------------------------------------------------------------------------------------
def _index_dtype(limit: int) -> np.dtype:
    """uint16 when every value < limit fits (halves shard size for V, L <= 65536), else int32."""
    return np.dtype(np.uint16) if limit <= 1 << 16 else np.dtype(np.int32)


def pack_sample(targets: TopKTargets, b: int) -> dict[str, np.ndarray]:
    """Sample ``b``'s rows as compact numpy arrays (the per-sample record of a trajectory shard).

    Returns {'topk_pos': [n] uint16/int32 sequence positions masked at s,
             'topk_ids': [n, k] uint16/int32, 'topk_logp': [n, k] float16, 'tail_logp': [n] float32}.
    The tail stays float32: it can be a tiny mass whose log float16 would round coarsely, and it is
    one number per position (k times cheaper than the top-k block).
    """
    batch, seq_len = targets.positions.shape
    if not 0 <= b < batch:
        raise IndexError(f"sample index {b} out of range for a batch of {batch}.")
    counts = targets.positions.sum(dim=1)
    start = int(counts[:b].sum())
    stop = start + int(counts[b])
    pos = torch.nonzero(targets.positions[b], as_tuple=False).flatten()
    return {
        "topk_pos": pos.cpu().numpy().astype(_index_dtype(seq_len)),
        "topk_ids": targets.ids[start:stop].cpu().numpy().astype(_index_dtype(targets.vocab_size)),
        "topk_logp": targets.logp[start:stop].float().cpu().numpy().astype(np.float16),
        "tail_logp": targets.tail_logp[start:stop].float().cpu().numpy().astype(np.float32),
    }


def pack_batch(targets: TopKTargets) -> list[dict[str, np.ndarray]]:
    """Every sample's packed record (as :func:`pack_sample`), with one device-to-host copy per field.

    Only the packed top-k crosses to the host: ids [N, k], float16 log-probs [N, k], the tail [N] and the
    [B, L] mask of positions, i.e. bytes per sample proportional to k (and L), never to V. The float16
    cast happens on the device so the host receives the stored width, not float32.
    """
    batch, seq_len = targets.positions.shape
    ids = targets.ids.to(torch.int32).cpu().numpy().astype(_index_dtype(targets.vocab_size))
    logp = targets.logp.to(torch.float16).cpu().numpy()
    tail = targets.tail_logp.to(torch.float32).cpu().numpy()
    positions = targets.positions.cpu().numpy()
    out, start = [], 0
    for b in range(batch):
        pos = np.flatnonzero(positions[b])
        stop = start + pos.shape[0]
        out.append({"topk_pos": pos.astype(_index_dtype(seq_len)), "topk_ids": ids[start:stop],
                    "topk_logp": logp[start:stop], "tail_logp": tail[start:stop]})
        start = stop
    return out


def unpack_samples(samples: Sequence[Mapping[str, np.ndarray]], seq_len: int, vocab_size: int,
                   logp_dtype: torch.dtype = torch.float32) -> TopKTargets:
    """Collate packed samples (from :func:`pack_sample`) into one batch of :class:`TopKTargets`.

    Validates every array so a corrupt or mismatched shard fails here with the sample and key named,
    not as a shape error inside the loss.
    """
    if not samples:
        raise ValueError("unpack_samples needs at least one sample.")
    positions = torch.zeros(len(samples), seq_len, dtype=torch.bool)
    ids, logp, tail = [], [], []
    k = None
    for b, rec in enumerate(samples):
        missing = [key for key in PACKED_KEYS if key not in rec]
        if missing:
            raise KeyError(f"packed sample {b} lacks {missing}; expected keys {PACKED_KEYS}.")
        pos = np.asarray(rec["topk_pos"]).astype(np.int64)
        r_ids, r_logp, r_tail = (np.asarray(rec[key]) for key in ("topk_ids", "topk_logp", "tail_logp"))
        n = pos.shape[0]
        if pos.ndim != 1 or r_ids.ndim != 2 or r_ids.shape != r_logp.shape or r_ids.shape[0] != n \
                or r_tail.shape != (n,):
            raise ValueError(f"packed sample {b}: inconsistent shapes topk_pos {pos.shape}, topk_ids "
                             f"{r_ids.shape}, topk_logp {r_logp.shape}, tail_logp {r_tail.shape}.")
        if k is None:
            k = r_ids.shape[1]
        elif r_ids.shape[1] != k:
            raise ValueError(f"packed sample {b} has top-k {r_ids.shape[1]}, earlier samples {k}.")
        if n and (pos.min() < 0 or pos.max() >= seq_len or np.any(np.diff(pos) <= 0)):
            raise ValueError(f"packed sample {b}: topk_pos must be increasing positions in [0, {seq_len}).")
        if r_ids.size and (r_ids.astype(np.int64).min() < 0 or r_ids.astype(np.int64).max() >= vocab_size):
            raise ValueError(f"packed sample {b}: topk_ids outside [0, {vocab_size}).")
        positions[b, torch.from_numpy(pos)] = True
        ids.append(torch.from_numpy(r_ids.astype(np.int32)))
        logp.append(torch.from_numpy(r_logp.astype(np.float32)))
        tail.append(torch.from_numpy(r_tail.astype(np.float32)))
    return TopKTargets(torch.cat(ids), torch.cat(logp).to(logp_dtype), torch.cat(tail), positions, vocab_size)
