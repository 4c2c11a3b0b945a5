"""The same network as a DeepSpeed ``PipelineModule`` (3D menu: TP x PP x DP with ZeRO 0/1).

Layers are thin subclasses of the plain model's classes (one source of truth for the math) that speak
DeepSpeed's activation protocol: each layer takes and returns a tensor or a tuple of tensors.

    stage input      (z [B, L] int64, t [B] float)  -- or z alone without time conditioning
    EmbeddingPipe    -> (h, t)    | h                 TiedLayerSpec('embed') when tie_embeddings
    TimePipe         -> (h, c)                        time_conditioning only
    BlockPipe x L    -> (h, c)    | h
    FinalPipe        -> h
    HeadPipe         -> logits [B, L, Vp/tp]          (or the tied embedding's projection)

Partitioning: ``parallel.pipeline_partition: uniform`` puts L/pp blocks on every stage with the
embedding (and time embedding) on the first and the final norm + head on the last -- computed here,
because DeepSpeed's own 'uniform' counts the small layers as blocks and could leave the time
embedding on stage 1, forcing the raw t across a stage boundary. 'parameters' is DeepSpeed's
parameter-balanced split.

Activation checkpointing is DeepSpeed's (one block per segment, ``checkpointable_layers=[BlockPipe]``)
with our RNG-replaying checkpoint function, so dropout masks are reproduced in the recompute.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Union

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from mcd_scale.config import Config, ModelConfig
from mcd_scale.model.build import dropout_rng, model_dtype
from mcd_scale.model.init import init_weights
from mcd_scale.model.layers import FinalNorm, TimeEmbedding, TransformerBlock
from mcd_scale.model.logical import name_parameters
from mcd_scale.model.rng_tracker import DropoutRNG, checkpoint
from mcd_scale.model.tp_layers import ColumnParallel, VocabEmbedding, tied_vocab_projection
from mcd_scale.model.transformer import check_tp

Activation = Union[torch.Tensor, tuple[torch.Tensor, ...]]


class EmbeddingPipe(VocabEmbedding):
    """Token embedding; passes t on to the time embedding when time-conditioned."""

    def __init__(self, cfg: ModelConfig, tp_group, dtype: torch.dtype) -> None:
        super().__init__(cfg.padded_vocab, cfg.hidden, tp_group=tp_group, dtype=dtype)
        self.time_conditioning = cfg.time_conditioning
        name_parameters(self, "embed.")

    def forward(self, inputs: Activation) -> Activation:  # type: ignore[override]
        z, t = (inputs[0], inputs[1] if len(inputs) > 1 else None) if isinstance(inputs, tuple) else (inputs, None)
        h = super().forward(z)
        if not self.time_conditioning:
            return h
        if t is None:
            raise ValueError("time-conditioned pipeline: feed (z, t) as the first stage's input")
        return h, t


class TimePipe(TimeEmbedding):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__(cfg.cond_dim, dtype)
        name_parameters(self, "time.")

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        h, t = inputs
        return h, super().forward(t)


class BlockPipe(TransformerBlock):
    def __init__(self, cfg: ModelConfig, index: int, tp_group, dtype: torch.dtype, rng: DropoutRNG) -> None:
        # DeepSpeed does the checkpointing (activation_checkpoint_func), so the block must not.
        super().__init__(cfg, tp_group=tp_group, dtype=dtype, rng=rng, activation_checkpointing=False)
        name_parameters(self, f"blocks.{index}.")

    def forward(self, inputs: Activation) -> Activation:  # type: ignore[override]
        if isinstance(inputs, tuple):
            h, c = inputs
            return super().forward(h, c), c
        return super().forward(inputs)


class FinalPipe(FinalNorm):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__(cfg, dtype=dtype)
        name_parameters(self, "final.")

    def forward(self, inputs: Activation) -> torch.Tensor:  # type: ignore[override]
        if isinstance(inputs, tuple):
            return super().forward(*inputs)
        return super().forward(inputs)


class HeadPipe(ColumnParallel):
    def __init__(self, cfg: ModelConfig, tp_group, dtype: torch.dtype) -> None:
        super().__init__(cfg.hidden, cfg.padded_vocab, tp_group=tp_group, dtype=dtype, bias=False)
        name_parameters(self, "head.")


def tied_head_forward(embedding: EmbeddingPipe, h: torch.Tensor) -> torch.Tensor:
    """The output head on the last stage's copy of the tied embedding."""
    return tied_vocab_projection(h, embedding.weight, embedding.tp_group)


class DiffusionPipelineModule(PipelineModule):
    """PipelineModule with our block-uniform partitioning (see module docstring)."""

    def __init__(self, layers: list, *, num_pre: int, num_blocks: int, **kwargs: Any) -> None:
        self._num_pre, self._num_blocks = num_pre, num_blocks
        super().__init__(layers, **kwargs)

    def _partition_layers(self, method: str = "uniform") -> None:
        if method != "uniform":
            return super()._partition_layers(method)
        stages, per = self.num_stages, self._num_blocks // self.num_stages
        self.parts = ([0] + [self._num_pre + s * per for s in range(1, stages)] + [len(self._layer_specs)])
        stage_id = self._topo.get_coord(self.global_rank).pipe
        # Private DeepSpeed API (0.19.x): the one call the base class makes after choosing parts.
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])


def pipeline_layer_specs(cfg: ModelConfig, tp_group, dtype: torch.dtype, rng: DropoutRNG) -> list:
    """The LayerSpecs, first stage to last."""
    embed_args = (cfg, tp_group, dtype)
    specs: list = [TiedLayerSpec("embed", EmbeddingPipe, *embed_args) if cfg.tie_embeddings
                   else LayerSpec(EmbeddingPipe, *embed_args)]
    if cfg.time_conditioning:
        specs.append(LayerSpec(TimePipe, cfg, dtype))
    specs += [LayerSpec(BlockPipe, cfg, i, tp_group, dtype, rng) for i in range(cfg.layers)]
    specs.append(LayerSpec(FinalPipe, cfg, dtype))
    specs.append(TiedLayerSpec("embed", EmbeddingPipe, *embed_args, forward_fn=tied_head_forward)
                 if cfg.tie_embeddings else LayerSpec(HeadPipe, cfg, tp_group, dtype))
    return specs


def build_pipeline_module(cfg: Config, dims, loss_fn: Optional[Callable[[torch.Tensor, Any], torch.Tensor]],
                          *, dtype: Optional[torch.dtype] = None, init: bool = True) -> DiffusionPipelineModule:
    """This rank's pipeline stage, initialised from ``train.seed`` (layout-independent values).

    ``loss_fn(logits_shard, labels) -> scalar`` runs on the last stage. The topology is
    ``dims.deepspeed_topology()`` (same rank order as megatron-core's groups).
    """
    m = cfg.model
    check_tp(m, dims.tp, dims.tp_group)
    if m.layers % dims.pp:
        raise ValueError(f"model.layers ({m.layers}) is not divisible by parallel.pp ({dims.pp})")
    dtype = dtype or model_dtype(cfg)
    rng = dropout_rng(cfg, dims)
    specs = pipeline_layer_specs(m, dims.tp_group, dtype, rng)
    module = DiffusionPipelineModule(
        specs, num_pre=2 if m.time_conditioning else 1, num_blocks=m.layers,
        topology=dims.deepspeed_topology(), loss_fn=loss_fn, partition_method=cfg.parallel.pipeline_partition,
        activation_checkpoint_interval=1 if cfg.parallel.activation_checkpointing else 0,
        activation_checkpoint_func=functools.partial(checkpoint, rng=rng),
        checkpointable_layers=[BlockPipe.__name__])
    module.rng = rng
    if init:
        init_weights(module, cfg.train.seed, m.init_std, dims.tp_rank, dims.tp)
    return module
