"""Training objectives: how a micro-batch of data becomes (network inputs, loss labels), and the loss.

The split matters for pipeline parallelism: DeepSpeed's pipeline engine feeds ``inputs`` to the first
stage and ``labels`` to ``loss_fn(logits, labels)`` on the last stage, so all corruption (times,
masks, coupled pairs, teacher targets) happens on the data side and the loss is a pure function.
Every random draw is keyed by (seed, global sample id, step) so any layout computes the same batch.
"""
from __future__ import annotations

import torch

from mcd_scale.config import Config
from mcd_scale.diffusion.schedules import get_schedule
from mcd_scale.parallel.distributed import ParallelDims
from mcd_scale.diffusion.masking import mask_tokens, sample_times
from mcd_scale.diffusion.nelbo import nelbo_loss_vocab_parallel, nelbo_token_weights
from mcd_scale.distill.objective import build_distill_objective


class MdlmObjective:
    """Masked-diffusion NELBO (docs/method.md §2) on vocab-parallel logits."""

    name = "mdlm"

    def __init__(self, cfg: Config, dims: ParallelDims):
        self.cfg, self.dims = cfg, dims
        self.schedule = get_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
        self.mask_id = cfg.model.mask_id

    def prepare(self, micro: dict, step: int, seed_offset: int = 0) -> tuple[tuple, tuple]:
        d = self.cfg.diffusion
        x = micro["ids"].long()
        seed = self.cfg.train.seed + seed_offset
        t = sample_times(micro["position"], self.cfg.parallel.global_batch, step, seed, d.t_min, d.antithetic)
        z_t = mask_tokens(x, t, micro["sample_id"], step, seed, self.schedule, self.mask_id)
        weights = nelbo_token_weights(z_t, t, self.schedule, self.mask_id).float()
        t_in = t.float() if self.cfg.model.time_conditioning else torch.zeros_like(t, dtype=torch.float32)
        return (z_t, t_in), (x, weights)

    def loss(self, logits: torch.Tensor, labels: tuple) -> torch.Tensor:
        x, weights = labels
        m = self.cfg.model
        return nelbo_loss_vocab_parallel(logits, x, weights, m.vocab_size, m.padded_vocab,
                                         self.dims.tp_rank, self.dims.tp)


def build_objective(cfg: Config, dims: ParallelDims, teacher=None):
    if cfg.train.objective == "mdlm":
        return MdlmObjective(cfg, dims)
    return build_distill_objective(cfg, dims, teacher)
