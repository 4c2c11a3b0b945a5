"""Distillation objectives for the trainer: MCD (offline / online teacher) and the SDTT baseline.

Built by :func:`build_distill_objective` (called from :func:`mcd_scale.training.objectives.build_objective`).
Like :class:`~mcd_scale.training.objectives.MdlmObjective`, each objective splits a step into

* ``prepare(micro, step) -> (inputs, labels)``: everything random or teacher-side, on the data side,
  keyed by (train.seed, global sample id, step) so any layout computes the same batch;
  ``inputs = (z_t, t_in)`` for the student, ``labels`` a tuple of tensors;
* ``loss(logits_shard, labels) -> scalar``: a pure function of the student's vocab-parallel logits
  [B, L, padded_vocab / tp] (gathered over TP with a differentiable all-gather) and the labels.

MCD (``train.objective: mcd``, design docs/method.md section 5/6), round n = ``distill.round``:

* times: t from :func:`~mcd_scale.diffusion.masking.sample_times` (antithetic over the global batch),
  then (t, s) = :func:`~mcd_scale.distill.rounds.coupled_times` (t, dt_n), s = t - dt_n;
* pair: thresholds u = ``reveal_thresholds(sample_ids, L, train.seed, diffusion.duality_form, K=V+1,
  round_idx=distill.round)`` (one deterministic trajectory per sample and round, keyed as
  tools/precompute_trajectories.py keys it), (z_t, z_s) = :func:`~mcd_scale.diffusion.duality.coupled_pair`;
* teacher, ``distill.teacher_mode``:
  - ``online``: a :class:`~mcd_scale.distill.teacher.FrozenTeacher` holding this rank's TP shard of
    the teacher weights (a plain replica: NOT built under ZeRO-3, not a submodule of the student, not
    in the optimizer; checked by :meth:`McdObjective.attach`). Target = the exact
    ``full_from_logits(teacher(z_s), V, tau_n)``, labels ``(x, z_t, z_s, logp_T [B, L, V])``;
  - ``offline``: the micro-batch carries the precomputed ``t, s, tk_mask, tk_ids, tk_logp, tk_tail``
    (:mod:`mcd_scale.data.trajectories`); u is regenerated, the pair rebuilt from the stored (t, s) and
    its masked set at s compared with ``tk_mask`` (a mismatch means another seed, threshold form or
    dt than the shards were written with, and raises). Labels ``(x, z_t, z_s, ids, logp, tail)``.
* loss: :func:`~mcd_scale.distill.loss.mcd_loss` with ``distill.divergence`` (top-k targets use the
  'bucket' tail model).

SDTT (``train.objective: sdtt``, docs/method.md section 5b): z_t = independent MDLM masking at t; the frozen
teacher runs ``distill.sdtt_teacher_steps`` stochastic steps of size dt_n (generators keyed by
("sdtt", seed, sample id, step)); loss = :func:`~mcd_scale.distill.sdtt.sdtt_loss`.
"""
from __future__ import annotations

from typing import Optional
import os

import torch

from mcd_scale.config import Config
from mcd_scale.diffusion.schedules import get_schedule
from mcd_scale.parallel.distributed import ParallelDims
from mcd_scale.diffusion.masking import mask_tokens, sample_times
from mcd_scale.distill.loss import DenseTopK, mcd_loss
from mcd_scale.distill.reveal_order import ordered_thresholds
from mcd_scale.distill.rounds import pair_span, round_dt, round_temperature, round_times
from mcd_scale.distill.sdtt import sdtt_loss, sdtt_targets
from mcd_scale.distill.targets import full_from_logits
from mcd_scale.distill.teacher import FrozenTeacher
from mcd_scale.rng import keyed_generator

OFFLINE_KEYS = ("ids", "sample_id", "position", "t", "s", "tk_mask", "tk_ids", "tk_logp", "tk_tail")


def _time_input(cfg: Config, t: torch.Tensor) -> torch.Tensor:
    """The network's time input: float32 t, or zeros for a time-agnostic model (on t's device)."""
    return t.float() if cfg.model.time_conditioning else torch.zeros(t.shape, dtype=torch.float32, device=t.device)


def debug_checks() -> bool:
    """``MCD_DEBUG_CHECKS=1``: validate the loss's inputs in the training loop (host syncs every micro-batch;
    tests and debugging only). Read once, when an objective is built."""
    return os.environ.get("MCD_DEBUG_CHECKS", "0") == "1"


def _gather(logits: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    # lazy: loads megatron; importing this module does not need it
    from mcd_scale.model.tp_layers import gather_vocab_logits

    return gather_vocab_logits(logits, dims.tp, dims.tp_group)


def build_frozen_teacher(cfg: Config, dims: ParallelDims, teacher_state: Optional[dict]):
    """A :class:`FrozenTeacher` on this rank's TP shard from full logical weights (plain replica, never
    ZeRO-partitioned: ``build_model`` without a DeepSpeed config), moved to this rank's device."""
    # lazy: loads megatron; importing this module does not need it
    from mcd_scale.model.build import build_model
    from mcd_scale.model.weights import load_full_state_dict

    if teacher_state is None:
        raise ValueError(f"'train.objective: {cfg.train.objective}' with an in-job teacher needs its weights: set "
                         f"'distill.teacher' to the teacher's run directory, checkpoint directory or "
                         f"model.safetensors (got {cfg.distill.teacher!r}).")
    module = build_model(cfg, dims, ds_config=None, init=False)
    load_full_state_dict(module, teacher_state, dims)
    return FrozenTeacher(module, round=cfg.distill.round).to(dims.device)


class _TeacherMixin:
    cfg: Config
    dims: ParallelDims
    teacher = None

    def teacher_log_probs_fn(self):
        """(z [B, L], t [B]) -> gathered teacher logits [B, L, padded_vocab] (no autograd)."""
        teacher = self.teacher

        def fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            dev = self.dims.device  # the teacher lives there (build_frozen_teacher)
            logits = teacher(z.to(dev), _time_input(self.cfg, t.to(dev)))
            with torch.no_grad():
                return _gather(logits, self.dims)

        return fn

    def attach(self, engine) -> None:
        """Check the frozen teacher is outside the student (module, trainable set): raise otherwise.

        (Under ZeRO-3 the optimizer's param groups hold flat partitions, so membership is checked on the
        module; a parameter outside the module is never handed to ``deepspeed.initialize``.)"""
        if self.teacher is None:
            return
        teacher_params = list(self.teacher.module.parameters())
        if any(p.requires_grad for p in teacher_params):
            raise RuntimeError("a frozen-teacher parameter requires grad: something unfroze the teacher.")
        ids = {id(p) for p in teacher_params}
        module = getattr(engine, "module", None)
        if module is not None and any(id(p) in ids for p in module.parameters()):
            raise RuntimeError("the frozen teacher is registered inside the student module: it would be "
                               "optimised, ZeRO-partitioned and checkpointed with the student.")


class McdObjective(_TeacherMixin):
    """Masked Consistency Distillation of round ``distill.round`` (see the module docstring)."""

    name = "mcd"

    def __init__(self, cfg: Config, dims: ParallelDims, teacher_state: Optional[dict] = None):
        self.cfg, self.dims = cfg, dims
        d = cfg.distill
        self.mode = d.teacher_mode
        if self.mode not in ("offline", "online"):
            raise ValueError(f"'distill.teacher_mode' = {self.mode!r} is not one of 'offline', 'online'.")
        self.schedule = get_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
        self.vocab_size = cfg.model.vocab_size
        self.mask_id = cfg.model.mask_id
        self.dt = round_dt(d, d.round)
        self.temperature = round_temperature(d, d.round)
        self.divergence = d.divergence
        self.teacher = build_frozen_teacher(cfg, dims, teacher_state) if self.mode == "online" else None
        self.validate = debug_checks()

    # ------------------------------------------------------------------ data side
    def thresholds(self, sample_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
        """The per-sample coupled thresholds u (float64 [B, L]), keyed exactly as the precompute job keys
        them (mcd_scale.data.trajectories.thresholds_for): ``reveal_thresholds(ids, L, train.seed,
        diffusion.duality_form, K=V+1, round_idx=distill.round)``, banded by ``distill.reveal_order``
        (mcd_scale/distill/reveal_order.py); one fixed trajectory per sample and round."""
        # lazy: loads scipy; importing this module does not need it
        from mcd_scale.diffusion.duality import reveal_thresholds

        d = self.cfg.distill
        u = reveal_thresholds(sample_ids.long(), seq_len, self.cfg.train.seed, self.cfg.diffusion.duality_form,
                              K=self.vocab_size + 1, round_idx=d.round)
        return ordered_thresholds(u, sample_ids.long(), self.cfg.train.seed, d.round, d.reveal_order,
                                  d.reveal_stride, self.schedule)

    def times(self, positions: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, s) float64 [B] of this step: antithetic t, then the pair of ``distill.times`` with dt_n (the
        affine coupled map, or the sampler's grid step)."""
        d = self.cfg.diffusion
        t = sample_times(positions.long(), self.cfg.parallel.global_batch, step, self.cfg.train.seed, d.t_min,
                         d.antithetic)
        return round_times(t.double(), self.dt, d.t_min, self.cfg.distill.times)

    def prepare(self, micro: dict, step: int) -> tuple[tuple, tuple]:
        return self._prepare_offline(micro) if self.mode == "offline" else self._prepare_online(micro, step)

    def _prepare_online(self, micro: dict, step: int) -> tuple[tuple, tuple]:
        # lazy: loads scipy; importing this module does not need it
        from mcd_scale.diffusion.duality import coupled_pair

        x = micro["ids"].long()
        t, s = self.times(micro["position"], step)
        u = self.thresholds(micro["sample_id"], x.shape[1])
        z_t, z_s = coupled_pair(x, t, s, u, self.schedule, self.mask_id)
        logits = self.teacher_log_probs_fn()(z_s, s)
        # The target stays on the device (where the teacher made it); the engine moves the rest once.
        target = full_from_logits(logits, self.vocab_size, self.temperature)
        return (z_t, _time_input(self.cfg, t)), (x, z_t, z_s, target)

    def _prepare_offline(self, micro: dict) -> tuple[tuple, tuple]:
        # lazy: loads scipy; importing this module does not need it
        from mcd_scale.diffusion.duality import coupled_pair

        missing = [k for k in OFFLINE_KEYS if k not in micro]
        if missing:
            raise KeyError(f"offline MCD micro-batch lacks {missing} (has {sorted(micro)}): 'data.trajectories' "
                           f"must point at tools/precompute_trajectories.py output.")
        x = micro["ids"].long()
        t, s = micro["t"].double(), micro["s"].double()
        bad_dt = (t - s - pair_span(self.dt, self.cfg.distill.times)).abs() > 1e-6 * max(1.0, self.dt)
        if bool(bad_dt.any()):
            i = int(bad_dt.nonzero()[0, 0])
            raise ValueError(f"trajectory sample {int(micro['sample_id'][i])}: t - s = {float(t[i] - s[i]):.6g} but "
                             f"round {self.cfg.distill.round} has dt = {self.dt:.6g}: the shards were written for "
                             f"another round or dt0/dt_growth ('distill.round', 'data.trajectories').")
        u = self.thresholds(micro["sample_id"], x.shape[1])
        z_t, z_s = coupled_pair(x, t, s, u, self.schedule, self.mask_id)
        tk_mask = micro["tk_mask"].bool()
        regen = z_s == self.mask_id
        if not torch.equal(regen, tk_mask):
            bad = (regen != tk_mask).any(dim=1).nonzero().flatten().tolist()
            ids = [int(micro["sample_id"][b]) for b in bad[:5]]
            raise ValueError(f"offline MCD: the masked set of z_s regenerated from (train.seed="
                             f"{self.cfg.train.seed}, diffusion.duality_form={self.cfg.diffusion.duality_form!r}, "
                             f"stored t, s) differs from the trajectory shard's tk_mask for {len(bad)} sample(s) "
                             f"(sample ids {ids}): the shards were precomputed with another seed, threshold form "
                             f"or dt. Regenerate them or match the config to their manifest.")
        return ((z_t, _time_input(self.cfg, t)),
                (x, z_t, z_s, micro["tk_ids"].long(), micro["tk_logp"].float(), micro["tk_tail"].float()))

    # ------------------------------------------------------------------ loss (pure)
    def full_logits(self, logits_shard: torch.Tensor) -> torch.Tensor:
        return _gather(logits_shard, self.dims)

    def loss_and_stats(self, logits_shard: torch.Tensor, labels: tuple) -> tuple[torch.Tensor, dict]:
        logits = self.full_logits(logits_shard)
        if len(labels) == 4:  # labels are on the device already (TrainEngine moved them)
            x, z_t, z_s, target = labels
        elif len(labels) == 6:
            x, z_t, z_s, ids, logp, tail = labels
            target = DenseTopK(ids, logp, tail, self.vocab_size)  # rows outside z_s's masks are ignored
        else:
            raise ValueError(f"MCD labels must be (x, z_t, z_s, logp) or (x, z_t, z_s, ids, logp, tail); got "
                             f"{len(labels)} tensors.")
        return mcd_loss(logits, x, z_t, z_s, target, self.vocab_size, self.divergence,
                        topk_tail=self.cfg.distill.topk_tail, validate=self.validate)

    def loss(self, logits_shard: torch.Tensor, labels: tuple) -> torch.Tensor:
        return self.loss_and_stats(logits_shard, labels)[0]


class SdttObjective(_TeacherMixin):
    """The SDTT self-distillation baseline (online teacher only)."""

    name = "sdtt"

    def __init__(self, cfg: Config, dims: ParallelDims, teacher_state: Optional[dict] = None):
        self.cfg, self.dims = cfg, dims
        d = cfg.distill
        self.schedule = get_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
        self.vocab_size = cfg.model.vocab_size
        self.mask_id = cfg.model.mask_id
        self.dt = round_dt(d, d.round)
        self.temperature = round_temperature(d, d.round)
        self.n_steps = d.sdtt_teacher_steps
        if self.n_steps < 1:
            raise ValueError(f"'distill.sdtt_teacher_steps' must be >= 1, got {self.n_steps}.")
        self.teacher = build_frozen_teacher(cfg, dims, teacher_state)

    def prepare(self, micro: dict, step: int) -> tuple[tuple, tuple]:
        d, seed = self.cfg.diffusion, self.cfg.train.seed
        x = micro["ids"].long()
        t = sample_times(micro["position"].long(), self.cfg.parallel.global_batch, step, seed, d.t_min, d.antithetic)
        z_t = mask_tokens(x, t, micro["sample_id"].long(), step, seed, self.schedule, self.mask_id)
        gens = [keyed_generator("sdtt", seed, int(sid), step) for sid in micro["sample_id"].tolist()]
        target = sdtt_targets(self.teacher_log_probs_fn(), z_t, t.double(), self.dt, schedule=self.schedule,
                              vocab_size=self.vocab_size, generators=gens, n_steps=self.n_steps,
                              temperature=self.temperature)
        return (z_t, _time_input(self.cfg, t)), (z_t, target)

    def loss_and_stats(self, logits_shard: torch.Tensor, labels: tuple) -> tuple[torch.Tensor, dict]:
        logits = _gather(logits_shard, self.dims)
        z_t, target = labels  # on the device already (TrainEngine moved them)
        return sdtt_loss(logits, z_t, target, self.vocab_size)

    def loss(self, logits_shard: torch.Tensor, labels: tuple) -> torch.Tensor:
        return self.loss_and_stats(logits_shard, labels)[0]


def build_distill_objective(cfg: Config, dims: ParallelDims, teacher_state: Optional[dict] = None):
    """The objective for ``train.objective`` 'mcd' or 'sdtt' (``teacher_state``: full logical weights)."""
    obj = cfg.train.objective
    if obj == "mcd":
        return McdObjective(cfg, dims, teacher_state)
    if obj == "sdtt":
        # SDTT's teacher rollout is stochastic per step, so it always runs online (teacher_mode ignored).
        return SdttObjective(cfg, dims, teacher_state)
    raise ValueError(f"build_distill_objective: 'train.objective' = {obj!r} is not 'mcd' or 'sdtt'.")
