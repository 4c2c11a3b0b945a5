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

import math
from types import SimpleNamespace
from typing import Callable, Iterable, Optional

import torch

from mcd_scale.parallel import collectives
from mcd_scale.config import Config
from mcd_scale.parallel.deepspeed import deepspeed_config
from mcd_scale.parallel.distributed import ParallelDims, to_device
from mcd_scale.training.nonfinite import GradFiniteGuard, PipelineNonFiniteGuard, guard_nonfinite, poisoned
from mcd_scale.data.bad_input import stop_every_rank
from mcd_scale.training import faults
from mcd_scale.training.optim import build_optimizer


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
        # lazy: loads deepspeed; importing this module does not need it
        import deepspeed

        self.cfg, self.dims, self.loss_fn = cfg, dims, loss_fn
        self.pipeline = cfg.parallel.pp > 1
        ds_cfg = deepspeed_config(cfg, dims.world_size)
        self.ds_config = ds_cfg
        module = self._build_module(ds_cfg, init=init_state is None)
        self._load_init_state(module, init_state)
        trainable = [p for p in module.parameters() if p.requires_grad]
        optimizer = build_optimizer(cfg, trainable, dims.device)  # fused kernel on CUDA (mcd_scale/training/optim.py)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        # DeepSpeed would put its engine on cuda:LOCAL_RANK; under a one-GPU-per-rank binding that is not the
        # device init_distributed chose (mcd_scale.parallel.distributed.cuda_device_index), so name it.
        args = SimpleNamespace(device_rank=dims.device.index) if dims.device.type == "cuda" else None
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            args=args, model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg,
            mpu=None if self.pipeline else dims.mpu(), dist_init_required=False)
        self.module = module
        # Fault injection first (tests/faults): a hook registered earlier runs earlier, so the guard sees it.
        faults.install(module, dims.rank, lambda: int(self.engine.global_steps) + 1)
        # Both menus: this rank's own parameters (a pipeline stage's, under pp > 1).
        self.grad_guard = GradFiniteGuard(trainable, dims.device)
        self.guard = None
        if self.pipeline:
            self.guard = PipelineNonFiniteGuard(self.engine, loss_fn, dims.device, self.set_lr_scale,
                                                self.restore_lr, self.grad_guard)

    # ------------------------------------------------------------------ construction
    def _build_module(self, ds_cfg: dict, init: bool):
        # lazy: loads deepspeed; importing this module does not need it
        from mcd_scale.model.build import build_model

        if self.pipeline:
            from mcd_scale.model.pipeline import build_pipeline_module

            return build_pipeline_module(self.cfg, self.dims, self.loss_fn, init=init)
        # Under ZeRO-3 build_model constructs inside deepspeed.zero.Init (partitioned over DP only).
        return build_model(self.cfg, self.dims, ds_config=ds_cfg, init=init)

    def _load_init_state(self, module, init_state: Optional[dict]) -> None:
        if init_state is not None:
            # lazy: loads megatron; importing this module does not need it
            from mcd_scale.model.weights import load_full_state_dict

            load_full_state_dict(module, init_state, self.dims)

    # ------------------------------------------------------------------ steps
    def _world_mean(self, value: torch.Tensor) -> float:
        """World mean of a scalar (one collective, one host read: evaluation only, not the step path)."""
        return collectives.mean(value)

    def _any_rank(self, flag) -> bool:
        return collectives.any_rank(flag)

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

    def train_step(self, micro_batches: Iterable, poison: bool = False, stop_requested: bool = False,
                   bad_input: Optional[str] = None, n_micro: Optional[int] = None) -> tuple[float, bool, bool]:
        """One optimizer step over this rank's micro-batches. Returns (mean loss, skipped, stop on any rank).

        ``micro_batches`` may be a lazy iterable (``n_micro`` then gives its length): each (inputs, labels) is
        then prepared just before its forward and dropped after its backward, so an online teacher's target
        ([B, L, V] fp32) exists once at a time, not grad_accum times (the memory plan counts one).

        One collective and one host read per step, whatever the number of micro-batches (docs/architecture.md,
        "Device rule and collectives"): each micro-batch's non-finite flag and loss stay on the device, and the
        world agrees on [bad micro-batches, loss sum, stop requested, bad input] once, just before the optimizer
        step.
        A non-finite micro-batch contributes zero gradient (see :func:`guard_nonfinite`), so the skip is exact:
        the agreed step then runs at lr 0 on every rank. ``stop_requested`` (this rank's preemption signal)
        rides on the same collective, and so does ``bad_input`` (the error line of a sample this rank could not
        read; a stand-in filled its place): when any rank has one, every rank raises
        :class:`mcd_scale.data.bad_input.BadInput` before the optimizer update. ``poison`` (fault injection) turns this
        step's losses into NaN."""
        self.engine.train()
        if self.pipeline:  # the same policy inside the pipeline schedule (mcd_scale/training/nonfinite.py)
            self.guard.begin(poison, stop_requested, bad_input)
            try:
                self.engine.train_batch(data_iter=iter(self._on_device(micro_batches)))
            finally:
                skipped, loss_v, stop = self.guard.end()
            return (float("nan") if skipped else loss_v), skipped, stop
        n = len(micro_batches) if n_micro is None else n_micro
        dev = self.dims.device
        self.grad_guard.reset()
        n_bad = torch.zeros((), dtype=torch.float64, device=dev)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for i, (inputs, labels) in enumerate(micro_batches):
            inputs, labels = to_device((inputs, labels), dev)  # the one move of this micro-batch's data
            logits = self.engine(*inputs)
            loss = self.loss_fn(logits, labels)
            if poison:
                loss = poisoned(loss)
            loss, ok = guard_nonfinite(loss, logits)
            n_bad = n_bad + (~ok).double()
            loss_sum = loss_sum + torch.where(ok, loss.detach().double(), torch.zeros_like(loss_sum))
            self.engine.backward(loss)
            old = None
            if i == n - 1:  # the optimizer step follows: the one collective + host read
                n_bad = n_bad + self.grad_guard.bad.double()  # a non-finite gradient from a finite loss
                summary = torch.stack([n_bad, loss_sum, torch.full_like(loss_sum, float(stop_requested)),
                                       torch.full_like(loss_sum, float(bad_input is not None))])
                bad_total, loss_total, stop_total, bad_inputs = collectives.all_reduce(summary, "sum").tolist()
                if bad_inputs > 0:  # every rank, before any update (mcd_scale/data/bad_input.py)
                    stop_every_rank(bad_input)
                skipped = bad_total > 0
                old = self.set_lr_scale(0.0) if skipped else None
            self.engine.step()
            if old is not None:
                self.restore_lr(old)
        mean = loss_total / (n * collectives.world_size())
        return (float("nan") if skipped else mean), skipped, stop_total > 0

    def _on_device(self, micro_batches: Iterable) -> Iterable:
        """Pipeline menu: DeepSpeed's schedule moves inputs/labels itself only to its own device; ours first
        (lazily: the schedule pulls one micro-batch when it loads it)."""
        return (to_device(mb, self.dims.device) for mb in micro_batches)

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
        vals = [fn(self.engine(*inputs), labels).float()
                for inputs, labels in (to_device(mb, self.dims.device) for mb in micro_batches)]
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
        # lazy: loads megatron; importing this module does not need it
        from mcd_scale.model.weights import full_state_dict

        return full_state_dict(self.module, self.dims)

    def forward(self, z: torch.Tensor, t: Optional[torch.Tensor]):
        return self.engine(z, t)
