"""One typed configuration tree for every stage of mcd_scale.

The tree is a set of dataclasses (one per section) loaded from YAML files, later files overriding
earlier ones, then ``--set section.key=value`` overrides. Everything is validated at parse time:
unknown keys (with the nearest valid name), wrong types, and the cross-field rules of the
parallel layout (see :func:`validate_layout`). The DeepSpeed JSON is *derived* from this tree by
:func:`deepspeed_config`; nobody writes it by hand. The resolved tree is written to
``<run.dir>/config.resolved.yaml`` and into every checkpoint.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem. The message names the field (or file) and the fix.

    Always one line: a key, value or file name quoted in the message may hold a newline or another control
    character (found by config fuzzing, tests/faults/test_config_fuzz.py); those are shown escaped."""

    def __init__(self, message: str = "") -> None:
        super().__init__("".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                                 for ch in str(message)))


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    dir: str = "runs/default"
    """The run directory: config.resolved.yaml, metrics.jsonl, tb/, checkpoints/."""
    name: str = "mcd"
    """A human-readable run name used in logs."""


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    """Number of real tokens V. The mask id is V (the model has V+1 meaningful outputs)."""
    pad_vocab_multiple: int = 128
    """The embedding/output table is padded to a multiple of this (independent of TP, so weights
    are layout-independent); must be divisible by parallel.tp. Padded logits are set to -inf."""
    seq_len: int = 128
    """Tokens per sequence (fixed length, no padding)."""
    hidden: int = 256
    """Model width."""
    layers: int = 4
    """Number of transformer blocks; must be divisible by parallel.pp."""
    heads: int = 4
    """Attention heads; must be divisible by parallel.tp and divide hidden."""
    ffn_hidden: int = 1024
    """Width of the MLP; must be divisible by parallel.tp."""
    dropout: float = 0.0
    """Dropout on attention output and MLP output (0 disables)."""
    time_conditioning: bool = False
    """adaLN time conditioning (DiT-style). MDLM's OWT models are time-agnostic (False), which also
    lets samplers reuse the network output when nothing changed."""
    cond_dim: int = 128
    """Width of the time embedding when time_conditioning is on."""
    tie_embeddings: bool = False
    """Tie the output projection to the input embedding (tied across pipeline stages if pp>1)."""
    rope_base: float = 10000.0
    """Rotary embedding base."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation."""

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def padded_vocab(self) -> int:
        m = self.pad_vocab_multiple
        return int(math.ceil((self.vocab_size + 1) / m) * m)


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (megatron-core column/row parallel layers)."""
    pp: int = 1
    """Pipeline-parallel size (DeepSpeed PipelineModule). Only with ZeRO stage 0 or 1."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0..3. Stage 2/3 only without pipeline parallelism."""
    micro_batch: int = 4
    """Sequences per data-parallel rank per micro-step."""
    global_batch: int = 8
    """Sequences per optimizer step across all data-parallel ranks:
    global_batch = micro_batch x grad_accum x dp."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (saves memory, costs ~1/3 more compute)."""
    pipeline_partition: str = "uniform"
    """How PipelineModule splits layers: 'uniform' or 'parameters'."""
    offload_optimizer: bool = False
    """ZeRO optimizer-state offload to CPU (JIT-builds DeepSpeedCPUAdam on first use)."""
    fused_optimizer: bool = True
    """Use torch AdamW's fused CUDA kernel (one kernel per step instead of a loop over parameters). Applies
    on CUDA only; on the host the single-tensor AdamW is used whatever this says (mcd_scale/training/optim.py)."""
    overlap_comm: bool = True
    """ZeRO-2/3: overlap the gradient reduce-scatter (and ZeRO-3 parameter prefetch) with backward/forward
    compute. Costs pinned bucket buffers of reduce_bucket_elements (docs/performance.md)."""
    contiguous_gradients: bool = True
    """ZeRO-2/3: copy reduced gradient partitions into one contiguous buffer (no fragmentation of the
    allocator over a long run; one extra copy per bucket)."""
    reduce_dtype: str = "fp32"
    """Data type of the data-parallel gradient reduction under bf16: 'fp32' (exact sum of the DP ranks'
    bf16 gradients, twice the bytes) or 'bf16' (half the bytes, rounding at every reduction hop). Ignored
    in fp32 training (always fp32) and outside ZeRO-3 (DeepSpeed's own choice). See docs/performance.md
    "Decided GPU defaults"."""
    reduce_bucket_elements: int = 50_000_000
    """ZeRO-2/3 gradient reduction bucket (elements): reduce-scatter starts when this many gradient
    elements are ready. Two 1B blocks' TP shard (~25M each); DeepSpeed's 5e8 would hold the whole shard."""
    zero3_prefetch_elements: int = 50_000_000
    """ZeRO-3: parameter elements fetched ahead of use (stage3_prefetch_bucket_size)."""
    zero3_persistence_threshold: int = -1
    """ZeRO-3: parameters with at most this many elements (per TP shard) stay whole on every rank instead
    of being all-gathered at every use. -1: the largest 1-D parameter of the model (LayerNorm weights,
    biases, adaLN vectors), so only matrices are partitioned; 0: partition everything."""


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    """Linear warmup steps from 0 to optimizer.lr."""
    decay: str = "cosine"
    """'cosine', 'linear' or 'constant' after warmup (over train.steps)."""
    min_lr_ratio: float = 0.1
    """Final lr as a fraction of the peak for cosine/linear decay."""


@dataclass
class TrainConfig:
    objective: str = "mdlm"
    """'mdlm' (teacher pretraining, NELBO), 'mcd' (masked consistency distillation) or 'sdtt'
    (the stochastic self-distillation baseline)."""
    steps: int = 1000
    """Optimizer steps to run in this job (for distillation: per round, see distill.steps_per_round)."""
    seed: int = 1234
    """Root seed. Every reproducible draw is keyed by (purpose, global sample id, seed)."""
    precision: str = "fp32"
    """'fp32' or 'bf16'."""
    eval_every: int = 200
    """Run validation every N steps (0 disables)."""
    eval_batches: int = 4
    """Global batches per validation."""
    log_every: int = 10
    """Console / TensorBoard / metrics.jsonl logging interval in steps."""
    ema_decay: float = 0.0
    """EMA of the trained weights (0 disables; distillation uses 0.999)."""
    max_nonfinite_in_a_row: int = 5
    """Abort with exit code 3 (diverged) after this many consecutive non-finite losses."""


@dataclass
class DataConfig:
    path: str = "data/prepared"
    """Prepared token shards (tools/prepare_data.py output, with manifest.json)."""
    trajectories: str = ""
    """Trajectory shards for offline distillation (tools/precompute_trajectories.py output)."""
    num_workers: int = 0
    """Background reader workers per rank."""
    skip_corrupt: bool = False
    """Opt-in: skip (and count) unreadable samples instead of failing."""


@dataclass
class DiffusionConfig:
    schedule: str = "loglinear"
    """Masking schedule alpha_t: 'loglinear' (1-(1-eps)t) or 'cosine'."""
    eps: float = 1e-3
    """Schedule epsilon: alpha_1 = eps for loglinear."""
    t_min: float = 1e-3
    """Smallest sampled time: t = (1 - t_min) u + t_min."""
    antithetic: bool = True
    """Stratify t over the global batch (low-variance NELBO estimate)."""
    duality_form: str = "uniform"
    """How coupled trajectories draw thresholds: 'uniform' (fast, exact) or 'gaussian'."""


@dataclass
class TemperatureConfig:
    schedule: str = "paper"
    """'paper' (start, minus step per round, floored), 'constant' (start every round) or 'off' (1.0)."""
    start: float = 0.96
    step: float = 0.03
    floor: float = 0.75


@dataclass
class DistillConfig:
    teacher: str = ""
    """Teacher checkpoint directory (or a consolidated .safetensors file)."""
    teacher_mode: str = "offline"
    """'offline' (top-k targets streamed from trajectory shards) or 'online' (frozen teacher in job)."""
    round: int = 0
    """The distillation round this job trains (dt = dt0 * growth(round))."""
    rounds: int = 4
    """Total rounds the driver runs."""
    steps_per_round: int = 500
    """Optimizer steps per round."""
    dt0: float = 1.0 / 512
    """Step size of round 0."""
    dt_growth: str = "double"
    """'double' (dt0 * 2^n) or 'linear' (dt0 * (n+1))."""
    divergence: str = "reverse_kl"
    """Divergence on tokens masked at both t and s: 'reverse_kl' or 'forward_kl'."""
    top_k: int = 64
    """Teacher log-probabilities kept per position in trajectory shards (plus a tail bucket)."""
    topk_tail: str = "bucket"
    """How the loss treats the teacher mass outside its top-k: 'bucket' (exact KL between the (k+1)-outcome
    distributions; minimised by the teacher) or 'uniform' (tail spread evenly over the other ids)."""
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    """Teacher temperature per round."""
    sdtt_teacher_steps: int = 2
    """SDTT baseline: number of stochastic teacher steps of size dt."""
    reveal_order: str = "random"
    """Which tokens the MCD coupling reveals together in (s, t]: 'random' (i.i.d. thresholds, docs/method.md §4) or
    'strided' (the strided coupled sampler's order: residue classes j mod reveal_stride in separate bands; distil
    for the order the student is sampled with, mcd_scale/distill/reveal_order.py)."""
    reveal_stride: int = 0
    """The strided order's spacing: the step count the student will be sampled with (tools/sample.py --stride).
    Required (>= 2) with reveal_order 'strided'; ignored with 'random'."""
    times: str = "uniform"
    """Where the MCD pairs (t, s) lie: 'uniform' (t uniform, s = t - dt) or 'grid' (one step of the sampler's
    own 1/dt-step grid, as the student is sampled; every round's dt must be 1/n; mcd_scale/distill/rounds.py
    grid_times)."""


@dataclass
class CheckpointConfig:
    every: int = 500
    """Save every N steps (0: only at the end)."""
    keep_last: int = 3
    """Keep the newest N checkpoints (0 keeps all)."""
    load: str = "latest"
    """'latest' (resume if present), 'none', or a step number / tag to resume from."""
    consolidated: bool = True
    """Also write layout-independent full weights (model.safetensors) with each checkpoint."""
    universal: bool = False
    """Also write universal.safetensors (fp32 master weights and Adam moments as full logical tensors), so
    the run can resume at another TP/DP/ZeRO layout (mcd_scale/checkpoint/universal.py). Costs one gather of ~3x the
    fp32 model on rank 0 per checkpoint."""


@dataclass
class DistributedConfig:
    timeout_s: float = 600.0
    """Seconds a collective (or the start-up rendezvous) waits for a missing rank before this rank fails
    with an error (exit non-zero), so one dead or hung rank cannot hold the others forever. Passed to
    torch.distributed's process group and to megatron-core's groups. Must exceed the longest legitimate
    wait between ranks: rank 0 writing a consolidated checkpoint, a slow validation or data read. Measured
    exit times after a dead rank: docs/reliability.md."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard events under <run.dir>/tb."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s of one device for MFU (e.g. 989 for H100 bf16). None => MFU is null."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


CHOICES = {
    "parallel.pipeline_partition": ("uniform", "parameters"),
    "schedule.decay": ("cosine", "linear", "constant"),
    "parallel.reduce_dtype": ("fp32", "bf16"),
    "train.objective": ("mdlm", "mcd", "sdtt"),
    "train.precision": ("fp32", "bf16"),
    "diffusion.schedule": ("loglinear", "cosine"),
    "diffusion.duality_form": ("uniform", "gaussian"),
    "distill.teacher_mode": ("offline", "online"),
    "distill.dt_growth": ("double", "linear"),
    "distill.divergence": ("reverse_kl", "forward_kl"),
    "distill.topk_tail": ("bucket", "uniform"),
    "distill.temperature.schedule": ("paper", "constant", "off"),
    "distill.reveal_order": ("random", "strided"),
    "distill.times": ("uniform", "grid"),
}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _nearest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(sorted(options))}."


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the dataclass field type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}.")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(eval_fraction(value))
            except (ValueError, ZeroDivisionError):
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}.")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}.")
    raise ConfigError(f"{where}: unsupported field type {tp!r}.")


def eval_fraction(text: str) -> float:
    """Parse '0.5', '1e-3' or a fraction like '1/512'."""
    text = text.strip()
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def _apply(obj: Any, data: dict, prefix: str, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{where}'.{_nearest(key, names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            _apply(getattr(obj, key), value if value is not None else {}, where + ".", source)
        else:
            word = "on" if value is True else "off"
            if tp is str and isinstance(value, bool) and word in CHOICES.get(where, ()):
                # YAML 1.1 reads a bare off/on as a boolean; where that word is a valid choice
                # (distill.temperature.schedule: off) the user meant the word.
                value = word
            setattr(obj, key, _coerce(value, tp, f"{source}: '{where}'"))


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value (e.g. --set parallel.tp=2).")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({' '.join(str(exc).split())}); "
                          f"quote it, e.g. --set 'run.name=\"my run\"'.") from None
    return key.strip().split("."), value


def load_config(files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from YAML files (later override earlier) and 'a.b=c' overrides.

    Field-level validation (types, choices, ranges) happens here; layout rules that need the world
    size happen in :func:`validate_layout`.
    """
    cfg = Config()
    for path in files:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist (pass --config with a YAML file, "
                              f"e.g. configs/tiny/teacher.yaml).")
        with open(path, "r", encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                # PyYAML's message spans lines (mark, snippet): the contract is one line.
                raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
        _apply(cfg, data, "", path)
    for text in overrides:
        keys, value = _parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested, "", f"--set {text}")
    validate_fields(cfg)
    return cfg


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate_fields(cfg: Config) -> None:
    """Checks that need no world size."""
    for dotted, options in CHOICES.items():
        value = get_field(cfg, dotted)
        _require(value in options, f"'{dotted}' = {value!r} is not one of {', '.join(options)}.")
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for name in ("vocab_size", "seq_len", "hidden", "layers", "heads", "ffn_hidden", "pad_vocab_multiple"):
        _require(getattr(m, name) > 0, f"'model.{name}' must be positive, got {getattr(m, name)}.")
    _require(m.hidden % m.heads == 0,
             f"'model.hidden' ({m.hidden}) must be divisible by 'model.heads' ({m.heads}).")
    _require((m.hidden // m.heads) % 2 == 0,
             f"head dim hidden/heads = {m.hidden // m.heads} must be even for rotary embeddings.")
    _require(0.0 <= m.dropout < 1.0, f"'model.dropout' must be in [0, 1), got {m.dropout}.")
    for name in ("tp", "pp", "micro_batch", "global_batch"):
        _require(getattr(p, name) >= 1, f"'parallel.{name}' must be >= 1, got {getattr(p, name)}.")
    _require(p.zero_stage in (0, 1, 2, 3), f"'parallel.zero_stage' must be 0, 1, 2 or 3, got {p.zero_stage}.")
    for name in ("reduce_bucket_elements", "zero3_prefetch_elements"):
        _require(getattr(p, name) >= 1, f"'parallel.{name}' must be >= 1, got {getattr(p, name)}.")
    _require(p.zero3_persistence_threshold >= -1,
             f"'parallel.zero3_persistence_threshold' must be -1 (auto), 0 or a positive element count, "
             f"got {p.zero3_persistence_threshold}.")
    _require(t.steps >= 0, f"'train.steps' must be >= 0, got {t.steps}.")
    _require(0.0 <= t.ema_decay < 1.0, f"'train.ema_decay' must be in [0, 1), got {t.ema_decay}.")
    _require(t.log_every >= 1, f"'train.log_every' must be >= 1, got {t.log_every}.")
    _require(0.0 < cfg.diffusion.eps < 1.0, f"'diffusion.eps' must be in (0, 1), got {cfg.diffusion.eps}.")
    _require(0.0 < cfg.diffusion.t_min < 1.0, f"'diffusion.t_min' must be in (0, 1), got {cfg.diffusion.t_min}.")
    d = cfg.distill
    _require(0.0 < d.dt0 < 1.0, f"'distill.dt0' must be in (0, 1), got {d.dt0}.")
    _require(d.top_k >= 1, f"'distill.top_k' must be >= 1, got {d.top_k}.")
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
            # round_dt's rule (mcd_scale/distill/rounds.py), restated: this module must not import torch.
            dt = d.dt0 * (2.0 ** n if d.dt_growth == "double" else n + 1)
            steps = round(1.0 / dt)
            _require(steps >= 1 and abs(steps * dt - 1.0) <= 1e-9,
                     f"'distill.times: grid' needs every round's dt to be 1/n (whole sampler steps); round {n} has "
                     f"dt = {dt:.6g} from 'distill.dt0' = {d.dt0:.6g}: set dt0 = 1/(steps * 2^(rounds-1)).")
    _require(cfg.checkpoint.keep_last >= 0, "'checkpoint.keep_last' must be >= 0.")
    _require(cfg.checkpoint.every >= 0, "'checkpoint.every' must be >= 0.")
    timeout = cfg.distributed.timeout_s
    _require(math.isfinite(timeout) and 1.0 <= timeout <= 86400.0,
             f"'distributed.timeout_s' must be a number of seconds in [1, 86400], got {timeout}.")
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


# --------------------------------------------------------------------------------------------
# Derived: DeepSpeed config, serialisation
# --------------------------------------------------------------------------------------------
def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON, derived from the tree (the only place it is written)."""
    validate_layout(cfg, world_size)
    p = cfg.parallel
    ds: dict = {
        "train_batch_size": p.global_batch,
        "train_micro_batch_size_per_gpu": p.micro_batch,
        "gradient_accumulation_steps": grad_accum(cfg, world_size),
        "gradient_clipping": cfg.optimizer.grad_clip,
        "steps_per_print": 10 ** 9,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": p.zero_stage},
        "zero_allow_untested_optimizer": True,
    }
    if p.zero_stage >= 2:
        ds["zero_optimization"].update({
            "overlap_comm": p.overlap_comm,
            "contiguous_gradients": p.contiguous_gradients,
            "reduce_bucket_size": p.reduce_bucket_elements,
        })
    if p.zero_stage == 3:
        ds["zero_optimization"].update({
            "stage3_param_persistence_threshold": persistence_threshold(cfg),
            "stage3_prefetch_bucket_size": p.zero3_prefetch_elements,
            "stage3_gather_16bit_weights_on_model_save": False,
        })
    if p.offload_optimizer and p.zero_stage >= 1:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if cfg.train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        if p.zero_stage == 3:  # DeepSpeed's default under bf16 is a bf16 reduction; state the decided one
            ds["communication_data_type"] = p.reduce_dtype
    if p.pp > 1:
        ds["pipeline"] = {"activation_checkpoint_interval": 1 if p.activation_checkpointing else 0}
    return ds


def persistence_threshold(cfg: Config) -> int:
    """ZeRO-3 persistence threshold in elements (per TP shard): the configured one, or for -1 the
    largest 1-D parameter (norms and biases are a few KiB each, but gathering them one by one costs a
    collective's latency per vector, several per block per pass)."""
    p, m = cfg.parallel, cfg.model
    if p.zero3_persistence_threshold >= 0:
        return p.zero3_persistence_threshold
    vectors = [m.hidden, 3 * m.hidden // p.tp, m.ffn_hidden // p.tp]  # norms/row biases, qkv, fc1 biases
    if m.time_conditioning:
        vectors.append(6 * m.hidden)  # adaLN modulation bias (replicated)
    return max(vectors)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(data: dict, source: str = "<dict>") -> Config:
    cfg = Config()
    _apply(cfg, data, "", source)
    validate_fields(cfg)
    return cfg


def save_resolved(cfg: Config, path: str) -> None:
    """Write the resolved YAML atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(to_yaml(cfg))
    os.replace(tmp, path)


def get_field(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def field_docs() -> dict[str, str]:
    """{'section.key': docstring} for the config reference (docs/config.md is generated from it)."""
    import ast
    import inspect

    docs: dict[str, str] = {}

    def visit(cls, prefix):
        src = inspect.getsource(cls)
        tree = ast.parse(src)
        body = tree.body[0].body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                name = node.target.id
                doc = ""
                if i + 1 < len(body) and isinstance(body[i + 1], ast.Expr) and isinstance(
                        getattr(body[i + 1], "value", None), ast.Constant):
                    doc = " ".join(str(body[i + 1].value.value).split())
                tp = typing.get_type_hints(cls)[name]
                if dataclasses.is_dataclass(tp):
                    visit(tp, f"{prefix}{name}.")
                else:
                    docs[f"{prefix}{name}"] = doc

    visit(Config, "")
    return docs
