"""One call that builds, shards and initialises the network for a config and a layout."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from mcd_scale.config import Config
from mcd_scale.model.init import init_weights
from mcd_scale.model.rng_tracker import DropoutRNG
from mcd_scale.model.transformer import DiffusionTransformer


def model_dtype(cfg: Config) -> torch.dtype:
    """Parameter/compute dtype from ``train.precision``."""
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def dropout_rng(cfg: Config, dims) -> DropoutRNG:
    """The dropout streams for this rank, keyed by (train.seed, pp, dp, tp rank)."""
    if dims is None:
        return DropoutRNG(cfg.train.seed)
    return DropoutRNG(cfg.train.seed, tp_rank=dims.tp_rank, dp_rank=dims.dp_rank, pp_rank=dims.pp_rank)


def zero3_init_context(ds_config: Optional[dict], dims, dtype: torch.dtype):
    """``deepspeed.zero.Init`` partitioning over the DATA-parallel group only (partitioning over the
    world would mix different TP shards), or a null context when ZeRO-3 is off."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        return contextlib.nullcontext()
    # lazy: loads deepspeed; importing this module does not need it
    import deepspeed

    # dtype is left to the DeepSpeed config: zero.Init's explicit `dtype` argument is ignored on
    # accelerators without fp16 (an operator-precedence bug in 0.19.8 picks bf16 on CPU).
    config_dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else (
        torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32)
    if config_dtype != dtype:
        raise ValueError(f"ZeRO-3 builds parameters in the DeepSpeed config's dtype {config_dtype}, "
                         f"but {dtype} was requested; set train.precision accordingly")
    # mem_efficient_linear=False: keep torch's F.linear (DeepSpeed's replacement can outlive the context).
    return deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False,
                               data_parallel_group=dims.dp_group if dims is not None else None,
                               mpu=dims.mpu() if dims is not None else None)


def build_model(cfg: Config, dims=None, *, ds_config: Optional[dict] = None, dtype: Optional[torch.dtype] = None,
                init: bool = True) -> DiffusionTransformer:
    """The plain (non-pipeline) model on this rank's TP shard, initialised from ``train.seed``.

    With a ZeRO-3 ``ds_config`` it is built under ``deepspeed.zero.Init`` (the full model never exists
    on one rank) and initialised one gathered parameter at a time. Collective under ZeRO-3.
    """
    if dims is not None and dims.pp != 1:
        raise ValueError(f"build_model is the pp=1 form; with parallel.pp={dims.pp} use build_pipeline_module")
    dtype = dtype or model_dtype(cfg)
    tp_size = 1 if dims is None else dims.tp
    tp_group = None if dims is None else dims.tp_group
    with zero3_init_context(ds_config, dims, dtype):
        model = DiffusionTransformer(cfg.model, tp_size, tp_group, dtype=dtype,
                                     activation_checkpointing=cfg.parallel.activation_checkpointing,
                                     rng=dropout_rng(cfg, dims))
    if init:
        init_weights(model, cfg.train.seed, cfg.model.init_std, 0 if dims is None else dims.tp_rank, tp_size)
    return model
