"""Build the DeepSpeed engine for one of the two parallel menus, behind one small interface.

Order of construction (why it is this order):
1. model built on this rank's TP shard (megatron-core layers) — under ``deepspeed.zero.Init`` for
   ZeRO-3 so parameters are partitioned over the data-parallel group as they are created (a 1B model
   never materialises whole on one rank);
2. weights initialised layout-independently (full logical tensor from the seed, then this rank's
   slice) or loaded from a consolidated teacher (student initialisation);
3. torch AdamW + our LambdaLR schedule handed to ``deepspeed.initialize`` with the derived DeepSpeed
   config and our ``mpu`` (so ZeRO partitions over DP only and clips over the whole model);
4. pipeline menu: the same blocks as a ``PipelineModule`` trained by DeepSpeed's pipeline engine.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from mcd_scale.config import Config, deepspeed_config
from mcd_scale.distributed import ParallelDims


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Multiplier of optimizer.lr at optimizer step k: linear warmup then cosine/linear/constant."""
    warm, total, floor = cfg.schedule.warmup_steps, max(cfg.train.steps, 1), cfg.schedule.min_lr_ratio
    decay = cfg.schedule.decay

    def fn(k: int) -> float:
        if warm > 0 and k < warm:
            return (k + 1) / warm
        if decay == "constant":
            return 1.0
        progress = min(max((k - warm) / max(total - warm, 1), 0.0), 1.0)
        if decay == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def params_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


class TrainEngine:
    """One interface over DeepSpeed's plain and pipeline engines.

    ``micro_batches`` are lists of ``(inputs, labels)`` tuples prepared by an objective:
    inputs = (z, t) for the network, labels = whatever the objective's loss needs.
    """

    def __init__(self, cfg: Config, dims: ParallelDims, loss_fn: Callable, init_state: Optional[dict] = None):
        import deepspeed

        self.cfg, self.dims, self.loss_fn = cfg, dims, loss_fn
        self.pipeline = cfg.parallel.pp > 1
        ds_cfg = deepspeed_config(cfg, dims.world_size)
        self.ds_config = ds_cfg
        module = self._build_module(ds_cfg, init=init_state is None)
        self._load_init_state(module, init_state)
        trainable = [p for p in module.parameters() if p.requires_grad]
        from mcd_scale.optim import build_optimizer

        optimizer = build_optimizer(cfg, trainable, dims.device)  # fused kernel on CUDA (mcd_scale/optim.py)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg,
            mpu=None if self.pipeline else dims.mpu(), dist_init_required=False)
        self.module = module
        self.guard = None
        if self.pipeline:
            from mcd_scale.pipeline_guard import PipelineNonFiniteGuard

            self.guard = PipelineNonFiniteGuard(self.engine, loss_fn, self._any_rank, self.set_lr_scale,
                                                self.restore_lr)

    # ------------------------------------------------------------------ construction
    def _build_module(self, ds_cfg: dict, init: bool):
        from mcd_scale.model.build import build_model

        if self.pipeline:
            from mcd_scale.model.pipeline import build_pipeline_module

            return build_pipeline_module(self.cfg, self.dims, self.loss_fn, init=init)
        # Under ZeRO-3 build_model constructs inside deepspeed.zero.Init (partitioned over DP only).
        return build_model(self.cfg, self.dims, ds_config=ds_cfg, init=init)

    def _load_init_state(self, module, init_state: Optional[dict]) -> None:
        if init_state is not None:
            from mcd_scale.model.weights import load_full_state_dict

            load_full_state_dict(module, init_state, self.dims)

    # ------------------------------------------------------------------ steps
    def _world_mean(self, value: torch.Tensor) -> float:
        v = value.detach().double().reshape(1).clone()
        if dist.is_initialized():
            dist.all_reduce(v)
            v /= dist.get_world_size()
        return float(v.item())

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def set_lr_scale(self, scale: float) -> list[float]:
        """Temporarily scale the learning rate (0 = skip the update); returns the old lrs."""
        groups = self.engine.optimizer.param_groups
        old = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * scale
        return old

    def restore_lr(self, old: list[float]) -> None:
        for g, lr in zip(self.engine.optimizer.param_groups, old):
            g["lr"] = lr

    def train_step(self, micro_batches: list, poison: bool = False) -> tuple[float, bool]:
        """One optimizer step over this rank's micro-batches. Returns (mean loss, skipped).

        ``poison`` (fault injection) turns this step's loss into NaN to exercise the skip policy."""
        self.engine.train()
        if self.pipeline:  # the same policy inside the pipeline schedule (mcd_scale/pipeline_guard.py)
            self.guard.begin(poison)
            try:
                loss = self.engine.train_batch(data_iter=iter(micro_batches))
            finally:
                skipped = self.guard.end()
            loss_v = float(loss.item()) if torch.is_tensor(loss) else float(loss)
            return (float("nan") if skipped else loss_v), skipped
        losses, nonfinite = [], False
        for i, (inputs, labels) in enumerate(micro_batches):
            logits = self.engine(*inputs)
            loss = self.loss_fn(logits, labels)
            if poison:
                loss = loss * float("nan")
            # All ranks agree per micro-batch, so a bad sample on one rank never leaves peers stepping
            # with a partial gradient: the loss is zeroed everywhere and the update skipped.
            bad = self._any_rank(not bool(torch.isfinite(loss.detach()).item()))
            if bad:
                nonfinite = True
                # A zero connected to the graph through finite values only (backward of a non-finite
                # loss would put inf*0 = NaN into the gradients).
                loss = logits.float().nan_to_num(0.0, 0.0, 0.0).sum() * 0.0
            last = i == len(micro_batches) - 1
            old = self.set_lr_scale(0.0) if (last and nonfinite) else None
            self.engine.backward(loss)
            self.engine.step()
            if old is not None:
                self.restore_lr(old)
            losses.append(loss.detach().float() if not bad else torch.tensor(float("nan")))
        mean = torch.stack(losses).mean()
        return (float("nan") if nonfinite else self._world_mean(mean)), nonfinite

    @torch.no_grad()
    def eval_loss(self, micro_batches: list, loss_fn: Optional[Callable] = None) -> float:
        """Mean loss over micro-batches (world-averaged). ``loss_fn`` defaults to the training loss;
        the pipeline engine can only evaluate with the loss it was built with."""
        self.engine.eval()
        if self.pipeline:
            if loss_fn is not None and loss_fn is not self.loss_fn:
                self.engine.module.loss_fn = loss_fn
            try:
                loss = self.engine.eval_batch(data_iter=iter(micro_batches), compute_loss=True)
            finally:
                self.engine.module.loss_fn = self.loss_fn
            return float(loss.item()) if torch.is_tensor(loss) else float(loss)
        fn = loss_fn or self.loss_fn
        vals = [fn(self.engine(*inputs), labels).float() for inputs, labels in micro_batches]
        return self._world_mean(torch.stack(vals).mean())

    def grad_norm(self) -> Optional[float]:
        try:
            g = self.engine.get_global_grad_norm()
        except Exception:
            return None
        if g is None:
            return None
        return float(g.item()) if torch.is_tensor(g) else float(g)

    def lr(self) -> float:
        return float(self.engine.optimizer.param_groups[0]["lr"])

    def full_state_dict(self) -> dict:
        from mcd_scale.model.weights import full_state_dict

        return full_state_dict(self.module, self.dims)

    def forward(self, z: torch.Tensor, t: Optional[torch.Tensor]):
        return self.engine(z, t)
