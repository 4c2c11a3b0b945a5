"""The DeepSpeed JSON, derived from the config tree (the only place it is written), and the ZeRO-3 persistence
threshold the memory plan shares."""
from __future__ import annotations

from mcd_scale.config import Config, grad_accum, validate_layout


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
