"""The per-rank memory plan (mcd_scale/parallel/memory_plan.py) against DeepSpeed's own ZeRO-3 estimator, its
parameter count against the model's, and its place in ``--dry-run``."""
from __future__ import annotations

import json
import os

import pytest

from mcd_scale.config import load_config
from mcd_scale.parallel.memory_plan import memory_plan, tp_shard_parameters
from mcd_scale.model.flops import count_parameters

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_B = [os.path.join(REPO, "configs", name) for name in ("teacher_1b.yaml", "distill_1b.yaml")]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("time_conditioning", [False, True])
def test_tp1_shard_is_the_whole_model(tie, time_conditioning):
    """At TP=1 the shard count is the model's exact parameter count (mcd_scale/model/flops.py)."""
    cfg = load_config(ONE_B[:1], ["parallel.tp=1", f"model.tie_embeddings={tie}",
                                  f"model.time_conditioning={time_conditioning}"])
    assert tp_shard_parameters(cfg)["total"] == count_parameters(cfg.model)


def test_tp2_shards_add_up_to_the_model_plus_replicated_vectors():
    cfg = load_config(ONE_B[:1])
    m = cfg.model
    replicated = m.layers * (4 * m.hidden + 2 * m.hidden) + 2 * m.hidden  # norms, proj/fc2 biases, final norm
    assert 2 * tp_shard_parameters(cfg)["total"] - replicated == count_parameters(m)


@pytest.mark.parametrize("path", ONE_B, ids=os.path.basename)
@pytest.mark.parametrize("world", [8, 16, 64])
def test_model_states_equal_deepspeed_zero3_estimator_under_its_convention(path, world):
    """DeepSpeed counts 18 B per parameter (4 B gradients) over the ranks of one ZeRO group plus 4 B
    per element of the largest layer; our plan under that convention must give the same bytes (the
    ZeRO group of a TP rank is its DP group: total_params = the TP shard, GPUs = dp)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cfg = load_config([path])
    plan = memory_plan(cfg, world, grad_bytes=4)
    shard = tp_shard_parameters(cfg)
    ours = (plan["bytes"]["parameters"] + plan["bytes"]["gradients"] + plan["bytes"]["optimizer_states"]
            + 4 * shard["largest_module"])
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(shard["total"], shard["largest_module"],
                                                         num_gpus_per_node=plan["dp"], num_nodes=1,
                                                         cpu_offload=False, cpu_offload_params=False)
    assert abs(ours - ds_gpu) <= 4, (ours, ds_gpu)  # int() rounding of three terms
    # Both 1B configs are ZeRO-3 + bf16, whose derived config accumulates gradients in fp32
    # (data_types.grad_accum_dtype): the default plan then counts DeepSpeed's 18 B per parameter itself.
    default = memory_plan(cfg, world)["bytes"]
    states = default["parameters"] + default["gradients"] + default["optimizer_states"]
    # tolerance: integer byte counts vs DeepSpeed's float estimate (int() of each term): relative ~1e-9 at these sizes
    assert states == pytest.approx(ds_gpu - 4 * shard["largest_module"], rel=1e-6)
    bf16_accum = memory_plan(cfg, world, grad_bytes=2)["bytes"]  # what the plan said before fp32 accumulation
    assert bf16_accum["gradients"] * 2 == pytest.approx(default["gradients"], abs=2)


def test_checkpointing_keeps_one_input_per_block_plus_one_block():
    cfg = load_config(ONE_B[:1])
    plan = memory_plan(cfg, 8)
    m, p = cfg.model, cfg.parallel
    sbh = m.seq_len * p.micro_batch * m.hidden
    per_block = sbh * (10 + 24 / p.tp)
    assert plan["activations_without_checkpointing"] == int(m.layers * per_block)
    assert plan["activations_with_checkpointing"] == int(m.layers * 2 * sbh + per_block)
    assert plan["bytes"]["logits_working_set"] == p.micro_batch * m.seq_len * m.padded_vocab // p.tp * 10


def test_online_teacher_adds_its_replica_and_target():
    offline = memory_plan(load_config(ONE_B[1:]), 16)
    online = memory_plan(load_config(ONE_B[1:], ["distill.teacher_mode=online"]), 16)
    assert "online_teacher" not in offline["bytes"]
    assert online["total_bytes"] - offline["total_bytes"] == online["bytes"]["online_teacher"] > 0


def test_dry_run_report_carries_the_plan_and_the_device_kind():
    """What --dry-run --world-size N prints beside the layout (mcd_scale/train.py dry_run_report)."""
    from mcd_scale.train import dry_run_report

    cfg = load_config(ONE_B[:1])
    out = json.loads(json.dumps(dry_run_report(cfg, 16, "cuda")))  # JSON-serialisable as printed
    assert out["memory_plan"] == json.loads(json.dumps(memory_plan(cfg, 16)))
    assert out["optimizer"]["fused"] is True and "fused" not in dry_run_report(cfg, 16, "cpu")["optimizer"]
    assert out["deepspeed"]["zero_optimization"]["stage3_param_persistence_threshold"] == 4096


@pytest.mark.parametrize("world", [0, 1, 3])
def test_a_world_size_the_layout_cannot_launch_is_refused_by_name(world):
    """TP=2 on 1 or 3 ranks has no integral DP size: a clear error, not a ZeroDivisionError or a plan
    for 1.5 replicas."""
    cfg = load_config(ONE_B[:1])
    assert cfg.parallel.tp * cfg.parallel.pp == 2
    with pytest.raises(ValueError, match="not a positive multiple of parallel.tp"):
        memory_plan(cfg, world)
