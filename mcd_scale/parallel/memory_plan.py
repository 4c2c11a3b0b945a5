"""Per-rank memory plan of a training config, from the config alone (no torch, no model build).

Byte convention (bf16 training; fp32 training replaces every 2 B by 4 B and has no separate master):

* model states per parameter of this rank's TP shard: bf16 weights 2 B, fp32 master 4 B, Adam m and v
  8 B, gradients 2 B (DeepSpeed accumulates the gradient partitions in the model dtype unless
  ``data_types.grad_accum_dtype`` says otherwise) = 16 B; ZeRO-1 divides the 12 B of optimizer states by
  DP, ZeRO-2 also the gradients, ZeRO-3 also the weights. DeepSpeed's own estimator
  (``estimate_zero3_model_states_mem_needs``) counts 18 B (4 B gradients) plus 4 B per element of the
  largest layer; tests/test_memory_plan.py checks that this plan equals it under that convention.
* ZeRO-3 live parameters: the largest module gathered whole (2 B per element of its TP shard) plus the
  prefetch bucket plus the persistent vectors (parallel.zero3_persistence_threshold); gradient buckets:
  reduce_bucket_elements in bf16 plus a 4 B copy when the reduction runs in fp32.
* activations per block and micro-batch (Korthikanti et al. 2022, "Reducing Activation Recomputation",
  16-bit activations, TP without sequence parallelism): s*b*h*(10 + 24/tp) bytes; the s^2 attention
  scores are not stored (SDPA's flash/memory-efficient kernels keep only a log-sum-exp per row).
  With activation checkpointing every block keeps only its bf16 input (2*s*b*h) and one block at a time
  holds its full set during the recompute.
* loss/logits working set: vocab-parallel logits [b, s, V_pad/tp] held in bf16 (2 B, the head output),
  as an fp32 copy for the loss (4 B) and as its fp32 gradient (4 B): 10 B per element.
* online distillation adds the frozen teacher's bf16 TP shard (2 B per parameter, not ZeRO-partitioned)
  and its fp32 target distribution [b, s, V] (4 B per element).
"""
from __future__ import annotations

from mcd_scale.config import Config
from mcd_scale.parallel.deepspeed import persistence_threshold

GIB = 1024 ** 3


def tp_shard_parameters(cfg: Config, tp: int | None = None) -> dict:
    """Parameters one TP rank holds (all pipeline stages together), the largest module's TP shard
    (the unit ZeRO-3 gathers at once) and the 1-D vectors below the persistence threshold.

    Counted here rather than by mcd_scale/model/flops.py because importing the model package pulls in
    megatron-core (seconds); tests/test_memory_plan.py checks that tp=1 gives flops.count_parameters."""
    m, tp = cfg.model, cfg.parallel.tp if tp is None else tp
    h, f, vp = m.hidden, m.ffn_hidden, m.padded_vocab
    block_mats = (3 * h * h + h * h + f * h + h * f) // tp
    block_vecs = {"norms": 4 * h, "qkv_bias": 3 * h // tp, "proj_bias": h, "fc1_bias": f // tp, "fc2_bias": h}
    table = vp * h // tp
    vectors = sum(block_vecs.values())
    per_block = block_mats + vectors
    adaln = 0
    if m.time_conditioning:  # replicated: block modulation + time MLP + final adaLN
        adaln = m.layers * (m.cond_dim * 6 * h + 6 * h)
        adaln += (256 * m.cond_dim + m.cond_dim) + (m.cond_dim ** 2 + m.cond_dim) + (m.cond_dim * 2 * h + 2 * h)
    total = table * (1 if m.tie_embeddings else 2) + m.layers * per_block + 2 * h + adaln
    threshold = persistence_threshold(cfg) if cfg.parallel.zero_stage == 3 else 0
    persistent = m.layers * sum(v for v in block_vecs.values() if v <= threshold) + (2 * h if 2 * h <= threshold else 0)
    return {"total": total, "largest_module": max(table, 3 * h * h // tp, f * h // tp),
            "persistent": persistent, "per_block": per_block}


def activation_bytes(cfg: Config, checkpointing: bool) -> int:
    """Saved activations of one micro-batch on one rank (this rank's pipeline stage: layers / pp)."""
    m, p = cfg.model, cfg.parallel
    s, b, h, tp = m.seq_len, p.micro_batch, m.hidden, p.tp
    act = 2 if cfg.train.precision == "bf16" else 4
    full_block = s * b * h * (10 + 24 / tp) * act / 2
    layers = m.layers // p.pp
    if checkpointing:
        return int(layers * act * s * b * h + full_block)
    return int(layers * full_block)


def logits_bytes(cfg: Config) -> int:
    m, p = cfg.model, cfg.parallel
    elems = p.micro_batch * m.seq_len * (m.padded_vocab // p.tp)
    return elems * ((2 if cfg.train.precision == "bf16" else 4) + 4 + 4)


def memory_plan(cfg: Config, world_size: int, grad_bytes: int | None = None) -> dict:
    """Per-rank bytes by item for ``cfg`` on ``world_size`` ranks (layout already validated).

    ``grad_bytes`` overrides the gradient convention (DeepSpeed's estimator uses 4)."""
    p, bf16 = cfg.parallel, cfg.train.precision == "bf16"
    if world_size < 1 or world_size % (p.tp * p.pp):
        # A plan for a layout that cannot launch would divide by a zero or fractional DP size.
        raise ValueError(f"world size {world_size} is not a positive multiple of parallel.tp * parallel.pp "
                         f"= {p.tp * p.pp}")
    dp = world_size // (p.tp * p.pp)
    shard = tp_shard_parameters(cfg)
    n = shard["total"] / p.pp  # pipeline stages split the blocks (approximately evenly)
    w = 2 if bf16 else 4
    g = grad_bytes if grad_bytes is not None else w
    opt = (4 if bf16 else 0) + 8
    items = {
        "parameters": int(n * w / (dp if p.zero_stage == 3 else 1)),
        "gradients": int(n * g / (dp if p.zero_stage >= 2 else 1)),
        "optimizer_states": int(n * opt / (dp if p.zero_stage >= 1 else 1)),
    }
    if p.zero_stage == 3:
        items["zero3_live_parameters"] = int(w * (shard["largest_module"] + p.zero3_prefetch_elements
                                                  + shard["persistent"]))
    if p.zero_stage >= 2:
        items["gradient_buckets"] = int(p.reduce_bucket_elements * (w + (4 if bf16 and p.reduce_dtype == "fp32" else 0)))
    items["activations"] = activation_bytes(cfg, p.activation_checkpointing)
    items["logits_working_set"] = logits_bytes(cfg)
    if cfg.train.objective in ("mcd", "sdtt") and (cfg.distill.teacher_mode == "online" or cfg.train.objective == "sdtt"):
        items["online_teacher"] = int(shard["total"] * w + 4 * p.micro_batch * cfg.model.seq_len * cfg.model.vocab_size)
    total = sum(items.values())
    return {
        "convention": ("bf16: weights 2 B, fp32 master 4 B, Adam m+v 8 B, gradients 2 B per parameter; "
                       "activations s*b*h*(10+24/tp) B per block; logits 10 B per vocab-parallel element"
                       if bf16 else "fp32: weights 4 B, Adam m+v 8 B, gradients 4 B per parameter"),
        "world_size": world_size, "dp": dp,
        "parameters_total": tp_shard_parameters(cfg, tp=1)["total"], "parameters_tp_shard": shard["total"],
        "bytes": items,
        "activations_without_checkpointing": activation_bytes(cfg, False),
        "activations_with_checkpointing": activation_bytes(cfg, True),
        "total_bytes": total, "total_gib": round(total / GIB, 2),
    }
