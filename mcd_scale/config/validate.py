"""Validation of the config tree: field rules at parse time (:func:`validate_fields`: choices, ranges, cross-field
rules) and the parallel layout for a world size (:func:`validate_layout`)."""
from __future__ import annotations

from typing import Any

from mcd_scale.config.schema import CHOICES, NON_EMPTY, RANGES, Config, round_dt
from mcd_scale.errors import ConfigError


def get_field(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate_fields(cfg: Config) -> None:
    """Checks that need no world size."""
    for dotted, options in CHOICES.items():
        value = get_field(cfg, dotted)
        _require(value in options, f"'{dotted}' = {value!r} is not one of {', '.join(options)}.")
    zero_stage = cfg.parallel.zero_stage
    _require(zero_stage in (0, 1, 2, 3), f"'parallel.zero_stage' must be 0, 1, 2 or 3, got {zero_stage}.")
    for dotted, rng in RANGES.items():
        value = get_field(cfg, dotted)
        if value is None:  # an optional field left unset (its type says so)
            continue
        _require(rng.contains(value), f"'{dotted}' must be in {rng.text()}, got {value}.")
    for dotted in NON_EMPTY:
        _require(bool(str(get_field(cfg, dotted)).strip()),
                 f"'{dotted}' is empty; give a path, e.g. --set {dotted}=runs/my_run.")
    m, p, t = cfg.model, cfg.parallel, cfg.train
    _require(m.hidden % m.heads == 0,
             f"'model.hidden' ({m.hidden}) must be divisible by 'model.heads' ({m.heads}).")
    _require((m.hidden // m.heads) % 2 == 0,
             f"head dim hidden/heads = {m.hidden // m.heads} must be even for rotary embeddings.")
    d = cfg.distill
    _require(0.0 < d.temperature.floor <= d.temperature.start,
             f"'distill.temperature.floor' ({d.temperature.floor}) must be in (0, start={d.temperature.start}].")
    if d.reveal_order == "strided":
        _require(d.reveal_stride >= 2, f"'distill.reveal_stride' must be >= 2 with 'distill.reveal_order: strided' "
                                       f"(the step count the student is sampled with), got {d.reveal_stride}.")
        _require(cfg.diffusion.duality_form == "uniform",
                 "'distill.reveal_order: strided' bands uniform thresholds; set 'diffusion.duality_form: uniform'.")
        _require(t.objective != "sdtt", "'distill.reveal_order: strided' applies to MCD's coupling; SDTT draws its "
                                        "own masks: set 'distill.reveal_order: random' for 'train.objective: sdtt'.")
    if d.times == "grid":
        _require(t.objective != "sdtt", "'distill.times: grid' applies to MCD's (t, s) pairs; SDTT draws its own "
                                        "times: set 'distill.times: uniform' for 'train.objective: sdtt'.")
        for n in range(max(d.rounds, d.round + 1)):
            dt = round_dt(d.dt0, d.dt_growth, n)
            steps = round(1.0 / dt)
            _require(steps >= 1 and abs(steps * dt - 1.0) <= 1e-9,
                     f"'distill.times: grid' needs every round's dt to be 1/n (whole sampler steps); round {n} has "
                     f"dt = {dt:.6g} from 'distill.dt0' = {d.dt0:.6g}: set dt0 = 1/(steps * 2^(rounds-1)).")
    if t.objective in ("mcd", "sdtt"):
        _require(p.pp == 1 or (t.objective == "mcd" and d.teacher_mode == "offline"),
                 "distillation with a teacher inside the job ('distill.teacher_mode: online' or "
                 "'train.objective: sdtt') needs 'parallel.pp: 1'; use the TP x DP + ZeRO-3 menu, "
                 "or offline trajectory shards with pipeline parallelism.")


MENUS = ("the two valid menus are (a) 3D: TP x PP x DP with 'parallel.zero_stage' 0 or 1, "
         "or (b) TP x DP with 'parallel.zero_stage: 3' (and 'parallel.pp: 1')")


def validate_layout(cfg: Config, world_size: int) -> None:
    """Rules that depend on the number of ranks. Raised before any process group exists."""
    p, m = cfg.parallel, cfg.model
    if p.pp > 1 and p.zero_stage >= 2:
        raise ConfigError(f"'parallel.pp' = {p.pp} with 'parallel.zero_stage' = {p.zero_stage}: DeepSpeed's "
                          f"pipeline engine refuses ZeRO-2/3; {MENUS}.")
    if p.pp > 1 and p.zero_stage == 0 and cfg.train.precision == "bf16":
        raise ConfigError("'parallel.pp' > 1 with bf16 and 'parallel.zero_stage: 0' cannot reload its own "
                          "checkpoints (a DeepSpeed bug: KeyError in bf16_optimizer); set "
                          "'parallel.zero_stage: 1'.")
    _require(world_size % (p.tp * p.pp) == 0,
             f"world size {world_size} is not divisible by parallel.tp x parallel.pp = {p.tp} x {p.pp}; "
             f"launch a multiple of {p.tp * p.pp} ranks or change the layout.")
    dp = world_size // (p.tp * p.pp)
    _require(m.heads % p.tp == 0, f"'model.heads' ({m.heads}) is not divisible by 'parallel.tp' ({p.tp}).")
    _require(m.ffn_hidden % p.tp == 0,
             f"'model.ffn_hidden' ({m.ffn_hidden}) is not divisible by 'parallel.tp' ({p.tp}).")
    _require(m.padded_vocab % p.tp == 0,
             f"padded vocabulary {m.padded_vocab} is not divisible by 'parallel.tp' ({p.tp}); raise "
             f"'model.pad_vocab_multiple'.")
    _require(m.layers % p.pp == 0, f"'model.layers' ({m.layers}) is not divisible by 'parallel.pp' ({p.pp}).")
    _require(p.global_batch % (p.micro_batch * dp) == 0,
             f"'parallel.global_batch' ({p.global_batch}) must equal micro_batch ({p.micro_batch}) x "
             f"grad_accum x dp ({dp}); make it a multiple of {p.micro_batch * dp}.")


def grad_accum(cfg: Config, world_size: int) -> int:
    dp = world_size // (cfg.parallel.tp * cfg.parallel.pp)
    return cfg.parallel.global_batch // (cfg.parallel.micro_batch * dp)
