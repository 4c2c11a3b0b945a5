"""The MDLM / MCD network: a bidirectional transformer over ``padded_vocab`` token ids with
vocab-parallel output logits.

Logical parameter names (identical at every TP/PP layout; see docs/model.md)::

    embed.weight                      [Vp, H]        split rows (vocab) across TP
    time.fc{1,2}.{weight,bias}        (time_conditioning only, replicated)
    blocks.{i}.norm{1,2}.{weight,bias}                replicated
    blocks.{i}.attn.qkv.{weight,bias} [3H, H], [3H]   split rows; rows ordered [heads, 3, head_dim]
    blocks.{i}.attn.proj.weight       [H, H]          split columns; bias replicated
    blocks.{i}.mlp.fc1.{weight,bias}  [F, H], [F]     split rows
    blocks.{i}.mlp.fc2.weight         [H, F]          split columns; bias replicated
    blocks.{i}.modulation.*           [6H, C]         (time_conditioning only, replicated, zero init)
    final.norm.*, final.modulation.*
    head.weight                       [Vp, H]         split rows (absent when tie_embeddings)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mcd_scale.config import ModelConfig
from mcd_scale.model.layers import FinalNorm, TimeEmbedding, TransformerBlock
from mcd_scale.model.logical import name_parameters
from mcd_scale.model.rng_tracker import DropoutRNG
from mcd_scale.model.tp_layers import ColumnParallel, VocabEmbedding, group_rank, group_size, tied_vocab_projection


def check_tp(model_cfg: ModelConfig, tp_size: int, tp_group) -> None:
    """Clear errors for a TP size the model cannot be split by, or a group that disagrees with it."""
    if tp_group is None and tp_size != 1:
        raise ValueError(f"tp_size={tp_size} needs a tensor-parallel process group (dims.tp_group)")
    if tp_group is not None and group_size(tp_group) != tp_size:
        raise ValueError(f"tp_size={tp_size} but the TP group has {group_size(tp_group)} ranks")
    for what, n in (("model.heads", model_cfg.heads), ("model.ffn_hidden", model_cfg.ffn_hidden),
                    ("padded vocabulary", model_cfg.padded_vocab)):
        if n % tp_size:
            raise ValueError(f"{what} ({n}) is not divisible by tensor-parallel size {tp_size}")


class DiffusionTransformer(nn.Module):
    """Bidirectional transformer: ``forward(z [B, L] int64, t [B] or None) -> logits [B, L, Vp/tp]``.

    The logits are this TP rank's vocabulary shard, columns ``[tp_rank*Vp/tp, (tp_rank+1)*Vp/tp)`` of the
    padded vocabulary (use :func:`mcd_scale.model.tp_layers.gather_vocab_logits` for the full table, or a
    vocab-parallel loss). Computed in the parameters' dtype. Padding columns are NOT masked here (SUBS
    does that). Parameters are created uninitialised: call :func:`mcd_scale.model.init.init_weights`.

    Args:
        model_cfg: the ``model`` config section.
        tp_size: tensor-parallel size; must equal the size of ``tp_group`` (1 without a group).
        tp_group: the TP process group (``dims.tp_group``), or None for a single process.
        dtype: parameter (and compute) dtype.
        activation_checkpointing: recompute each block in backward.
        rng: dropout streams; a default-seeded one is created if None (reseed with ``model.rng.seed``).
    """

    def __init__(self, model_cfg: ModelConfig, tp_size: int = 1, tp_group=None, *,
                 dtype: torch.dtype = torch.float32, activation_checkpointing: bool = False,
                 rng: Optional[DropoutRNG] = None) -> None:
        super().__init__()
        check_tp(model_cfg, tp_size, tp_group)
        self.cfg = model_cfg
        self.tp_size = tp_size
        self.tp_group = tp_group
        self.tp_rank = group_rank(tp_group)
        self.rng = rng if rng is not None else DropoutRNG(0, tp_rank=self.tp_rank)
        self.embed = VocabEmbedding(model_cfg.padded_vocab, model_cfg.hidden, tp_group=tp_group, dtype=dtype)
        self.time = TimeEmbedding(model_cfg.cond_dim, dtype) if model_cfg.time_conditioning else None
        self.blocks = nn.ModuleList(
            TransformerBlock(model_cfg, tp_group=tp_group, dtype=dtype, rng=self.rng,
                             activation_checkpointing=activation_checkpointing)
            for _ in range(model_cfg.layers))
        self.final = FinalNorm(model_cfg, dtype=dtype)
        self.head = (None if model_cfg.tie_embeddings else
                     ColumnParallel(model_cfg.hidden, model_cfg.padded_vocab, tp_group=tp_group, dtype=dtype,
                                    bias=False))
        name_parameters(self, "")
        if model_cfg.tie_embeddings:
            _register_tied_for_zero3(self, self.embed.weight)

    def forward(self, z: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.embed(z)
        c = None
        if self.time is not None:
            if t is None:
                raise ValueError("this model is time-conditioned (model.time_conditioning: true): pass t [B]")
            c = self.time(t)
        for block in self.blocks:
            h = block(h, c)
        h = self.final(h, c)
        if self.head is None:
            return tied_vocab_projection(h, self.embed.weight, self.tp_group)
        return self.head(h)


def _register_tied_for_zero3(module: nn.Module, weight: nn.Parameter) -> None:
    """Under ZeRO-3 a parameter is gathered only inside its owner's forward; the tied head uses the
    embedding weight outside it, so register it as an external parameter of ``module``."""
    if hasattr(weight, "ds_id"):
        # lazy: loads deepspeed; importing this module does not need it
        import deepspeed

        deepspeed.zero.register_external_parameter(module, weight)
