"""Layout-independent initialisation.

Each parameter's FULL logical tensor is generated from a generator keyed by (seed, logical name) and
this rank's TP slice is copied in. So a model initialised at TP=2 (or PP=2, or ZeRO-3-partitioned)
holds exactly the weights of the same model initialised in one process: an experiment's starting
point does not depend on the layout it runs on.

Under ZeRO-3 each parameter is gathered one at a time (``GatheredParameters(modifier_rank=0)``), so
peak memory is one full logical tensor, never the whole model.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from mcd_scale.model.logical import local_slice, logical_parameters
from mcd_scale.rng import key_to_seed, keyed_generator


def logical_init_tensor(name: str, shape: tuple[int, ...], init_kind: str, std: float, seed: int,
                        std_scale: float = 1.0) -> torch.Tensor:
    """The full float32 initial value of one logical parameter (a pure function of its arguments)."""
    if init_kind == "zeros":
        return torch.zeros(shape)
    if init_kind == "ones":
        return torch.ones(shape)
    if init_kind == "normal":
        gen = keyed_generator("init", seed, key_to_seed(name))
        return torch.empty(shape).normal_(0.0, std * std_scale, generator=gen)
    raise ValueError(f"{name}: unknown init_kind {init_kind!r}")


def _zero3_gathered(param: nn.Parameter):
    """A context in which ``param.data`` is the full local (TP-shard) tensor; written back on exit."""
    if hasattr(param, "ds_id"):
        # lazy: loads deepspeed; importing this module does not need it
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    return contextlib.nullcontext()


@torch.no_grad()
def init_weights(module: nn.Module, seed: int, std: float, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Initialise every parameter of ``module`` (a model, a pipeline stage) from its logical tensor.

    normal(0, std * init_std_scale) for matrices and embeddings, zeros for biases and adaLN
    modulation, ones for norm weights. Collective under ZeRO-3 (all data-parallel ranks must call it).
    """
    for name, param in logical_parameters(module):
        full = logical_init_tensor(name, param.logical_shape, param.init_kind, std, seed,
                                   getattr(param, "init_std_scale", 1.0))
        local = local_slice(full, param.tp_split_dim, tp_rank, tp_size)
        with _zero3_gathered(param):
            if tuple(param.data.shape) != tuple(local.shape):
                raise RuntimeError(f"{name}: local shape {tuple(param.data.shape)} != expected slice "
                                   f"{tuple(local.shape)} of {param.logical_shape} at tp {tp_rank}/{tp_size}")
            param.data.copy_(local.to(dtype=param.dtype, device=param.device))
