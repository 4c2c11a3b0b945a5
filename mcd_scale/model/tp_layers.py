"""Tensor-parallel linear/embedding layers: megatron-core's primitives, usable without a process group.

megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` / ``VocabParallelEmbedding`` assert a
process group in forward. The subclasses here keep megatron's parameters and communication when a TP
group is given and fall back to the same math with plain ``F.linear`` / ``F.embedding`` when there is
none (a single process with no torch.distributed: tp=1 tests, meta-device parameter counting,
sampling tools). Forward returns a tensor (not megatron's ``(output, bias)`` tuple).

All layers are built with ``perform_initialization=False``: values come from
:func:`mcd_scale.model.init.init_weights`, which is layout-independent. Each layer tags its parameters
with their logical shape and TP split dimension (:func:`mcd_scale.model.logical.set_logical`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, parallel_state
from mcd_scale.parallel import collectives
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                           copy_to_tensor_model_parallel_region)

from mcd_scale.model.logical import set_logical


def _no_init(_: torch.Tensor) -> None:
    """megatron wants an init_method; ours runs later (init_weights)."""


def parallel_config(tp_size: int, dtype: torch.dtype) -> ModelParallelConfig:
    """The megatron-core config for our layers: CPU-side allocation, no megatron initialisation,
    no fused CUDA kernels, no sequence parallelism (needs apex/TE norms)."""
    return ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                               perform_initialization=False, gradient_accumulation_fusion=False,
                               sequence_parallel=False, params_dtype=dtype)


def group_size(group) -> int:
    return 1 if group is None else group.size()


def group_rank(group) -> int:
    return 0 if group is None else group.rank()


class ColumnParallel(ColumnParallelLinear):
    """y = x A^T + b with A's output rows split contiguously across TP ranks (output stays sharded).

    ``weight`` may be passed to forward (tied output head) when built with ``own_weight=False``.
    """

    def __init__(self, in_features: int, out_features: int, *, tp_group, dtype: torch.dtype,
                 bias: bool = True, init_kind: str = "normal", own_weight: bool = True) -> None:
        super().__init__(in_features, out_features, config=parallel_config(group_size(tp_group), dtype),
                         init_method=_no_init, bias=bias, gather_output=False,
                         skip_weight_param_allocation=not own_weight, tp_group=tp_group)
        if self.weight is not None:
            set_logical(self.weight, (out_features, in_features), 0, init_kind)
        if self.bias is not None:
            set_logical(self.bias, (out_features,), 0, "zeros")

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:  # type: ignore[override]
        if self.tp_group is None:
            return F.linear(x, self.weight if weight is None else weight, self.bias)
        return super().forward(x, weight=weight)[0]


class RowParallel(RowParallelLinear):
    """y = x A^T + b with A's input columns split across TP ranks; input sharded, output all-reduced.
    The bias is replicated and added after the reduction."""

    def __init__(self, in_features: int, out_features: int, *, tp_group, dtype: torch.dtype,
                 bias: bool = True, init_kind: str = "normal") -> None:
        super().__init__(in_features, out_features, config=parallel_config(group_size(tp_group), dtype),
                         init_method=_no_init, bias=bias, input_is_parallel=True, skip_bias_add=False,
                         tp_group=tp_group)
        set_logical(self.weight, (out_features, in_features), 1, init_kind)
        if self.bias is not None:
            set_logical(self.bias, (out_features,), None, "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.tp_group is None:
            return F.linear(x, self.weight, self.bias)
        return super().forward(x)[0]


class VocabEmbedding(VocabParallelEmbedding):
    """Embedding with rows (vocabulary) split contiguously across TP ranks; output all-reduced."""

    def __init__(self, num_embeddings: int, dim: int, *, tp_group, dtype: torch.dtype) -> None:
        super().__init__(num_embeddings, dim, init_method=_no_init,
                         config=parallel_config(group_size(tp_group), dtype), tp_group=tp_group)
        set_logical(self.weight, (num_embeddings, dim), 0, "normal")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.tp_group is None:
            return F.embedding(ids, self.weight)
        return super().forward(ids)


def tied_vocab_projection(x: torch.Tensor, weight: torch.Tensor, tp_group) -> torch.Tensor:
    """Vocab-parallel logits from the (vocab-sharded) embedding table: x @ W_shard^T.

    ``x`` is replicated, so its gradient must be all-reduced across TP ranks (copy-to-region), exactly
    as a ColumnParallelLinear does for its input.
    """
    if tp_group is not None and tp_group.size() > 1:
        x = copy_to_tensor_model_parallel_region(x, group=tp_group)
    return F.linear(x, weight)


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim; backward keeps this rank's slice of the (replicated) gradient.

    Ours rather than megatron's ``gather_from_tensor_model_parallel_region``, which allocates its
    buffer with ``torch.cuda.current_device()`` and so cannot run on CPU.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return torch.cat(collectives.all_gather(x, group=group), dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        group = ctx.group
        return grad.chunk(group.size(), dim=-1)[group.rank()].contiguous(), None


def gather_vocab_logits(logits_shard: torch.Tensor, tp_size: int, tp_group=None) -> torch.Tensor:
    """Full padded-vocabulary logits from this rank's vocab shard (differentiable all-gather along the
    last dim; identity at tp=1). ``tp_group`` defaults to megatron-core's TP group.

    The backward assumes every TP rank computes the same function of the full logits (replicated
    loss). Prefer vocab-parallel losses in training: this materialises B*L*Vp per rank."""
    if tp_size == 1:
        return logits_shard
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    if tp_group.size() != tp_size:
        raise ValueError(f"gather_vocab_logits: tp_size={tp_size} but the group has {tp_group.size()} ranks")
    return _GatherLastDim.apply(logits_shard, tp_group)
