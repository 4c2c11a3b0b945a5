"""The config tree's schema: one dataclass per section, field docstrings (docs/config.md is generated from them),
the valid choices of every string field (:data:`CHOICES`) and the valid range of every numeric one
(:data:`RANGES`). Imports nothing from the package but :mod:`mcd_scale.errors`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional


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


class Range(NamedTuple):
    """A numeric field's valid values: ``lo`` .. ``hi``, each end closed unless ``*_open``; always finite."""
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False  # (ints compare exactly, however large)
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def text(self) -> str:
        def num(v: float) -> str:
            return f"{int(v)}" if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"
        return f"{'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


_COUNT = 2 ** 40  # an upper bound for step and element counts: large enough for any run, small enough to mean it
_SIZE = 2 ** 20   # model dimensions

RANGES: dict[str, Range] = {
    "model.vocab_size": Range(1, 2 ** 31 - 2),
    "model.pad_vocab_multiple": Range(1, _SIZE),
    "model.seq_len": Range(1, 2 ** 24),
    "model.hidden": Range(1, _SIZE),
    "model.layers": Range(1, 4096),
    "model.heads": Range(1, _SIZE),
    "model.ffn_hidden": Range(1, _SIZE),
    "model.dropout": Range(0.0, 1.0, hi_open=True),
    "model.cond_dim": Range(1, _SIZE),
    "model.rope_base": Range(1.0, 1e12, lo_open=True),
    "model.norm_eps": Range(0.0, 1.0, lo_open=True),
    "model.init_std": Range(0.0, 10.0, lo_open=True),
    "parallel.tp": Range(1, 4096),
    "parallel.pp": Range(1, 4096),
    "parallel.zero_stage": Range(0, 3),
    "parallel.micro_batch": Range(1, 2 ** 31),
    "parallel.global_batch": Range(1, 2 ** 31),
    "parallel.reduce_bucket_elements": Range(1, _COUNT),
    "parallel.zero3_prefetch_elements": Range(1, _COUNT),
    "parallel.zero3_persistence_threshold": Range(-1, _COUNT),
    "optimizer.lr": Range(0.0, 10.0, lo_open=True),
    "optimizer.weight_decay": Range(0.0, 10.0),
    "optimizer.beta1": Range(0.0, 1.0, hi_open=True),
    "optimizer.beta2": Range(0.0, 1.0, hi_open=True),
    "optimizer.eps": Range(0.0, 1.0, lo_open=True),
    "optimizer.grad_clip": Range(0.0, 1e6),
    "schedule.warmup_steps": Range(0, _COUNT),
    "schedule.min_lr_ratio": Range(0.0, 1.0),
    "train.steps": Range(1, _COUNT),
    "train.seed": Range(0, 2 ** 63 - 1),
    "train.eval_every": Range(0, _COUNT),
    "train.eval_batches": Range(1, 2 ** 31),
    "train.log_every": Range(1, _COUNT),
    "train.ema_decay": Range(0.0, 1.0, hi_open=True),
    "train.max_nonfinite_in_a_row": Range(1, 2 ** 31),
    "data.num_workers": Range(0, 1024),
    "diffusion.eps": Range(0.0, 1.0, lo_open=True, hi_open=True),
    "diffusion.t_min": Range(0.0, 1.0, lo_open=True, hi_open=True),
    "distill.round": Range(0, 63),
    "distill.rounds": Range(1, 64),
    "distill.steps_per_round": Range(1, _COUNT),
    "distill.dt0": Range(0.0, 1.0, lo_open=True, hi_open=True),
    "distill.top_k": Range(1, 2 ** 31),
    "distill.temperature.start": Range(0.0, 10.0, lo_open=True),
    "distill.temperature.step": Range(0.0, 1.0),
    "distill.temperature.floor": Range(0.0, 10.0, lo_open=True),
    "distill.sdtt_teacher_steps": Range(1, 1024),
    "distill.reveal_stride": Range(0, 2 ** 24),
    "checkpoint.every": Range(0, _COUNT),
    "checkpoint.keep_last": Range(0, 2 ** 31),
    "distributed.timeout_s": Range(1.0, 86400.0),
    "logging.peak_tflops": Range(0.0, 1e9, lo_open=True),
}
"""Every int and float field's valid range (an optional field may also be null); tests/test_config.py checks
that no numeric field is missing here."""

NON_EMPTY = ("run.dir",)
"""String fields that must not be empty."""


def round_dt(dt0: float, growth: str, n: int) -> float:
    """Step size of distillation round n: dt0 * 2^n ('double') or dt0 * (n + 1) ('linear'). The one statement of
    the rule: :func:`mcd_scale.distill.rounds.round_dt` and the config's validation both use it."""
    if growth == "double":
        return dt0 * 2.0 ** n
    if growth == "linear":
        return dt0 * (n + 1)
    raise ValueError(f"'distill.dt_growth' = {growth!r} is not one of 'double', 'linear'.")
