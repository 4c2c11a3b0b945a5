"""The validation NELBO / perplexity bound of a checkpoint: the trainer's own validation, on any split size.

:func:`validation_nelbo` IS the trainer's validation loop (``Trainer.validate`` calls it with its engine):
the fixed evaluation set is the first ``num_batches`` global batches of the split in id order
(``eval_loader``), each micro-batch is corrupted by ``MdlmObjective.prepare`` with the fixed key
``step = 10**9 + b`` (batch b) and scored by ``MdlmObjective.loss`` (the vocab-parallel NELBO of
mcd_scale/diffusion/nelbo.py), the figure is the mean over batches of the world-mean loss. So the tool's
number on the trainer's batches equals the trainer's logged ``val/nelbo``.

Time samples: each sequence gets one diffusion time per pass, antithetic over the global batch
(``diffusion.antithetic``: t_j = (o + j / G) mod 1 for global position j of G, one keyed offset o per
(seed, batch); MDLM's low-discrepancy rule) and scaled into [t_min, 1]; masks are keyed by (seed, sample
id, step). ``time_samples`` K > 1 repeats the pass with seeds ``train.seed + k`` (k = 0..K-1) and averages:
an unbiased estimate of the same bound with K times the time samples; k = 0 is the trainer's key.
Deterministic: same checkpoint, split, batches and K give the same figure on any data-parallel layout.
The bound: ``ppl_bound = exp(nelbo)`` (nats per token; the NELBO bounds the NLL from above).
"""
from __future__ import annotations

from typing import Any, Callable, Optional
import os

import torch
import torch.distributed as dist

# The loop itself lives with the trainer, which runs it during training; re-exported here for the tool.
from mcd_scale.training.validation import EVAL_STEP_BASE, validation_nelbo  # noqa: F401
from mcd_scale.cli import InputError
from mcd_scale.data.loader import open_prepared
from mcd_scale.inference import load_model
from mcd_scale.parallel import collectives
from mcd_scale.parallel.device import resolve_device
from mcd_scale.parallel.distributed import detect_launch_env, export_launch_env, to_device
from mcd_scale.training.objectives import MdlmObjective

def module_eval_loss(model: torch.nn.Module, device: torch.device) -> Callable[[list, Callable], float]:
    """``TrainEngine.eval_loss`` for a plain tp=1 module: mean loss over the micro-batches, world-averaged."""
    def eval_loss(micro_batches: list, loss_fn: Callable) -> float:
        with torch.no_grad():
            vals = [loss_fn(model(*inputs), labels).float()
                    for inputs, labels in (to_device(mb, device) for mb in micro_batches)]
        return collectives.mean(torch.stack(vals).mean())

    return eval_loss


def checkpoint_nelbo(checkpoint: str, data: Optional[str] = None, split: str = "val", batches: Optional[int] = None,
                     global_batch: Optional[int] = None, micro_batch: Optional[int] = None, time_samples: int = 1,
                     weights: str = "model", device: Optional[str] = None, progress: bool = False) -> dict:
    """The NELBO of a run / checkpoint / export on a prepared split, on this process's rank of the launcher's
    world (data-parallel; the caller initialised torch.distributed when world > 1). Defaults: the run's
    own ``data.path``, ``train.eval_batches``, ``parallel.global_batch`` and ``parallel.micro_batch``."""
    dev = resolve_device(device)
    loaded = load_model(checkpoint, weights=weights, device=dev)
    cfg = loaded.cfg
    data = data or cfg.data.path
    if not os.path.isdir(data):
        raise InputError(f"--data {data}: no prepared data directory (the checkpoint's data.path); pass --data DIR")
    dp, dp_rank = collectives.world_size(), collectives.rank()
    cfg.parallel.global_batch = global_batch or cfg.parallel.global_batch
    cfg.parallel.micro_batch = micro_batch or cfg.parallel.micro_batch
    if cfg.parallel.global_batch % (cfg.parallel.micro_batch * dp):
        raise InputError(f"--global-batch {cfg.parallel.global_batch} must be a multiple of --micro-batch "
                         f"{cfg.parallel.micro_batch} x world size {dp}")
    num_batches = batches or cfg.train.eval_batches
    m = cfg.model
    dataset = open_prepared(data, split, vocab_size=m.vocab_size, seq_len=m.seq_len)

    class _TP1:  # the layout the loss needs: one tensor-parallel rank
        tp, tp_rank = 1, 0

    objective = MdlmObjective(cfg, _TP1())
    show = None
    if progress and dp_rank == 0:
        def show(done: int, total: int) -> None:
            if done == total or done % max(1, total // 10) == 0:
                print(f"nelbo: batch {done}/{total}", flush=True)
    out = validation_nelbo(module_eval_loss(loaded.model, dev), objective, dataset, num_batches,
                           cfg.parallel.global_batch, cfg.parallel.micro_batch, dp_rank, dp, time_samples, show)
    return {**out, "checkpoint": loaded.weights_path, "weights": weights, "data": data, "split": split,
            "global_batch": cfg.parallel.global_batch, "antithetic": bool(cfg.diffusion.antithetic),
            "t_min": cfg.diffusion.t_min, "seed": cfg.train.seed, "world_size": dp}


def run_nelbo(checkpoint: str, **kwargs: Any) -> Optional[dict]:
    """:func:`checkpoint_nelbo` under whichever launcher started us: one process, or torchrun/srun/mpirun
    ranks sharing the global batch (gloo on CPU, NCCL on cuda:LOCAL_RANK). Returns the result on rank 0."""
    le = detect_launch_env()
    own = le.world_size > 1 and not dist.is_initialized()
    if own:
        export_launch_env(le)
        cuda = torch.cuda.is_available() and kwargs.get("device") in (None, "cuda")
        if cuda:
            torch.cuda.set_device(le.local_rank % torch.cuda.device_count())
            kwargs["device"] = f"cuda:{le.local_rank % torch.cuda.device_count()}"
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        out = checkpoint_nelbo(checkpoint, **kwargs)
    finally:
        if own:
            dist.destroy_process_group()
    return out if le.rank == 0 else None
