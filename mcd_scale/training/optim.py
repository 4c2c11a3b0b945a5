"""The optimizer, built once for the engine: torch AdamW with the kernel chosen by the device.

Why torch AdamW and not DeepSpeed's FusedAdam: it needs no JIT build (FusedAdam/DeepSpeedCPUAdam take
40-110 s to compile, docs/performance.md), and DeepSpeed's ZeRO wrappers accept it as a client optimizer
(they step it on their own fp32 partitions). ``fused=True`` runs one multi-tensor CUDA kernel for the
whole step instead of a Python loop over parameters; on the host the single-tensor path stays (the path
every CPU test and every CPU checkpoint was made with, so CPU results do not move).
"""
from __future__ import annotations

from typing import Iterable

from mcd_scale.config import Config


def adamw_options(cfg: Config, device_type: str) -> dict:
    """Keyword arguments of ``torch.optim.AdamW`` for this config on ``device_type`` ('cuda' or 'cpu').

    Pure (no torch import): ``--dry-run`` prints it beside the DeepSpeed dict."""
    o = cfg.optimizer
    options = {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": o.weight_decay}
    if device_type == "cuda" and cfg.parallel.fused_optimizer:
        options["fused"] = True
    return options


def build_optimizer(cfg: Config, params: Iterable, device) -> "torch.optim.Optimizer":  # noqa: F821
    """AdamW over ``params`` for a model living on ``device`` (``ParallelDims.device``)."""
    # lazy: loads torch; importing this module does not need it
    import torch

    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return torch.optim.AdamW(list(params), **adamw_options(cfg, device_type))
