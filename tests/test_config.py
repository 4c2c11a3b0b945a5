"""The typed config tree: errors that name the field and the fix, YAML layering, ``--set`` parsing,
the resolved-YAML round trip, the derived DeepSpeed dict, every shipped config, the CLI dry run and
the generated reference (docs/config.md).

Shipped configs: every ``configs/**/*.yaml`` (globbed at test time, so new configs are covered
without editing this file) must load and pass :func:`validate_layout` for one world size:

* the number given by a ``# world_size: N`` comment anywhere in the file, if there is one (use it
  when the config's batch sizes only divide for a larger launch, e.g. a 1B config meant for 64 ranks);
* otherwise the smallest world size its layout allows, ``parallel.tp x parallel.pp`` (DP = 1).
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from mcd_scale import EXIT_CONFIG
from mcd_scale.config import (Config, ConfigError, eval_fraction, from_dict, grad_accum, load_config, save_resolved,
                              to_dict, to_yaml, validate_layout)
from mcd_scale.parallel.deepspeed import deepspeed_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny", "teacher.yaml")


def _err(overrides=(), files=(), world=None) -> str:
    """The ConfigError message for a config that must be rejected (fails the test if accepted)."""
    with pytest.raises(ConfigError) as info:
        cfg = load_config(list(files), list(overrides))
        if world is not None:
            validate_layout(cfg, world)
    return str(info.value)


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------------------------
# Unknown keys, types, choices
# --------------------------------------------------------------------------------------------
def test_unknown_key_in_override_suggests_nearest():
    msg = _err(["parallel.zero_stag=1"])
    assert "'parallel.zero_stag'" in msg and "Did you mean 'zero_stage'?" in msg


def test_unknown_key_in_yaml_names_file_and_suggests(tmp_path):
    path = _write(tmp_path, "bad.yaml", "model:\n  hiden: 64\n")
    msg = _err(files=[path])
    assert path in msg and "'model.hiden'" in msg and "Did you mean 'hidden'?" in msg


def test_unknown_section_suggests_section():
    msg = _err(["paralel.tp=2"])
    assert "'paralel'" in msg and "Did you mean 'parallel'?" in msg


def test_unknown_key_without_close_match_lists_valid_keys():
    msg = _err(["parallel.xyzzy=1"])
    assert "'parallel.xyzzy'" in msg and "Valid keys:" in msg and "zero_stage" in msg and "micro_batch" in msg


@pytest.mark.parametrize("override, field, expected", [
    ("parallel.tp=two", "parallel.tp", "expected an integer"),
    ("parallel.tp=2.5", "parallel.tp", "expected an integer"),
    ("parallel.tp=true", "parallel.tp", "expected an integer"),        # a bool is not an int
    ("model.layers=[1, 2]", "model.layers", "expected an integer"),
    ("optimizer.lr=fast", "optimizer.lr", "expected a number"),
    ("optimizer.lr=false", "optimizer.lr", "expected a number"),
    ("model.tie_embeddings=maybe", "model.tie_embeddings", "expected true/false"),
    ("model.tie_embeddings=2", "model.tie_embeddings", "expected true/false"),
    ("run.name=[a, b]", "run.name", "expected a string"),
    ("run.name=true", "run.name", "expected a string"),
    ("logging.peak_tflops=lots", "logging.peak_tflops", "expected a number"),
])
def test_wrong_types_name_the_field(override, field, expected):
    msg = _err([override])
    assert f"'{field}'" in msg and expected in msg


def test_section_that_is_not_a_mapping(tmp_path):
    path = _write(tmp_path, "bad.yaml", "parallel: 3\n")
    msg = _err(files=[path])
    # (the message currently reads "'parallel.' must be a mapping": a cosmetic trailing dot, reported)
    assert path in msg and "'parallel" in msg and "must be a mapping, got 3" in msg


@pytest.mark.parametrize("override, field, options", [
    ("train.precision=fp16", "train.precision", "fp32, bf16"),
    ("train.objective=gan", "train.objective", "mdlm, mcd, sdtt"),
    ("schedule.decay=step", "schedule.decay", "cosine, linear, constant"),
    ("parallel.pipeline_partition=type:transformer", "parallel.pipeline_partition", "uniform, parameters"),
    ("distill.temperature.schedule=exp", "distill.temperature.schedule", "paper, constant, off"),
])
def test_invalid_choice_lists_the_options(override, field, options):
    msg = _err([override])
    assert f"'{field}'" in msg and options in msg


@pytest.mark.parametrize("overrides, needle", [
    (["parallel.zero_stage=4"], "'parallel.zero_stage' must be 0, 1, 2 or 3"),
    (["parallel.tp=0"], "'parallel.tp' must be in [1, 4096], got 0"),
    (["parallel.micro_batch=0"], "'parallel.micro_batch' must be in [1, 2147483648], got 0"),
    (["model.hidden=250"], "'model.hidden' (250) must be divisible by 'model.heads' (4)"),
    (["model.hidden=12", "model.heads=4"], "must be even for rotary"),
    (["model.dropout=1.0"], "'model.dropout' must be in [0, 1)"),
    (["model.vocab_size=0"], "'model.vocab_size' must be in [1, 2147483646], got 0"),
    (["diffusion.eps=0"], "'diffusion.eps' must be in (0, 1)"),
    (["distill.dt0=0"], "'distill.dt0' must be in (0, 1)"),
    (["distill.temperature.floor=0.99"], "'distill.temperature.floor'"),
    (["train.ema_decay=1.0"], "'train.ema_decay' must be in [0, 1)"),
    (["checkpoint.keep_last=-1"], "'checkpoint.keep_last' must be in [0, 2147483648], got -1"),
    (["train.objective=mcd", "distill.teacher_mode=online", "parallel.pp=2"], "needs 'parallel.pp: 1'"),
    (["train.objective=sdtt", "parallel.pp=2"], "needs 'parallel.pp: 1'"),
])
def test_field_rules(overrides, needle):
    assert needle in _err(overrides)


def test_set_without_equals_explains_the_syntax():
    msg = _err(["parallel.tp"])
    assert "expected section.key=value" in msg


def test_missing_and_invalid_yaml_files(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    msg = _err(files=[missing])
    assert missing in msg and "does not exist" in msg
    broken = _write(tmp_path, "broken.yaml", "model: [unclosed\n")
    msg = _err(files=[broken])
    assert broken in msg and "not valid YAML" in msg


# --------------------------------------------------------------------------------------------
# Layout rules (need the world size)
# --------------------------------------------------------------------------------------------
def test_batch_sizes_must_divide():
    # dp = 2, micro 4 => global must be a multiple of 8
    msg = _err(["parallel.micro_batch=4", "parallel.global_batch=12"], world=2)
    assert "'parallel.global_batch' (12)" in msg and "multiple of 8" in msg
    cfg = load_config([], ["parallel.micro_batch=4", "parallel.global_batch=24"])
    validate_layout(cfg, 2)
    assert grad_accum(cfg, 2) == 3


def test_world_size_divisible_by_tp_pp():
    msg = _err(["parallel.tp=2", "parallel.pp=2"], world=6)
    assert "world size 6" in msg and "parallel.tp x parallel.pp = 2 x 2" in msg and "multiple of 4" in msg


def test_heads_divisible_by_tp():
    msg = _err(["model.heads=6", "model.hidden=384", "parallel.tp=4"], world=4)
    assert "'model.heads' (6)" in msg and "'parallel.tp' (4)" in msg


def test_layers_divisible_by_pp():
    msg = _err(["model.layers=3", "parallel.pp=2"], world=2)
    assert "'model.layers' (3)" in msg and "'parallel.pp' (2)" in msg


def test_ffn_divisible_by_tp():
    msg = _err(["model.ffn_hidden=1002", "parallel.tp=4"], world=4)
    assert "'model.ffn_hidden' (1002)" in msg and "'parallel.tp' (4)" in msg


def test_padded_vocab_divisible_by_tp():
    # pad_vocab_multiple=1 => padded vocab = vocab_size + 1 (the mask token) = 4097, odd
    msg = _err(["model.pad_vocab_multiple=1", "parallel.tp=2"], world=2)
    assert "padded vocabulary 4097" in msg and "'model.pad_vocab_multiple'" in msg
    cfg = load_config([], ["model.pad_vocab_multiple=128", "parallel.tp=2"])
    assert cfg.model.padded_vocab == 4224 and cfg.model.padded_vocab % 128 == 0
    validate_layout(cfg, 2)


@pytest.mark.parametrize("stage", [2, 3])
def test_pipeline_with_zero_2_3_names_both_menus(stage):
    msg = _err(["parallel.pp=2", f"parallel.zero_stage={stage}"], world=2)
    assert "'parallel.pp' = 2" in msg and f"'parallel.zero_stage' = {stage}" in msg
    assert "(a) 3D: TP x PP x DP with 'parallel.zero_stage' 0 or 1" in msg
    assert "(b) TP x DP with 'parallel.zero_stage: 3'" in msg


def test_bf16_zero0_pipeline_is_refused_with_the_fix():
    msg = _err(["parallel.pp=2", "parallel.zero_stage=0", "train.precision=bf16"], world=2)
    assert "bf16" in msg and "set 'parallel.zero_stage: 1'" in msg
    # the suggested fix is accepted
    validate_layout(load_config([], ["parallel.pp=2", "parallel.zero_stage=1", "train.precision=bf16"]), 2)


@pytest.mark.parametrize("overrides, world", [
    (["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1", "parallel.global_batch=8"], 8),  # 3D
    (["parallel.tp=2", "parallel.zero_stage=3", "parallel.global_batch=16"], 8),                  # TP + ZeRO-3
    (["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=0"], 4),                              # 3D, fp32
])
def test_valid_layouts_pass(overrides, world):
    validate_layout(load_config([], overrides), world)


# --------------------------------------------------------------------------------------------
# YAML layering, --set parsing, round trip
# --------------------------------------------------------------------------------------------
def test_later_files_override_earlier_and_set_overrides_files(tmp_path):
    a = _write(tmp_path, "a.yaml", "model:\n  hidden: 128\n  layers: 2\nparallel:\n  tp: 2\n")
    b = _write(tmp_path, "b.yaml", "model:\n  layers: 6\nrun:\n  name: second\n")
    cfg = load_config([a, b])
    assert (cfg.model.hidden, cfg.model.layers, cfg.parallel.tp, cfg.run.name) == (128, 6, 2, "second")
    assert cfg.model.heads == Config().model.heads  # untouched fields keep their defaults
    cfg = load_config([b, a])
    assert cfg.model.layers == 2
    cfg = load_config([a, b], ["model.layers=8"])
    assert cfg.model.layers == 8 and cfg.model.hidden == 128


def test_set_parsing_types():
    cfg = load_config([], [
        "parallel.tp=2",                   # int
        "optimizer.lr=3e-4",               # YAML 1.1 reads '3e-4' as a string: coerced to float
        "optimizer.weight_decay=0.1",      # float
        "model.tie_embeddings=true",       # bool
        "train.eval_every=0",
        "distill.dt0=1/512",               # fraction
        "distill.temperature.start=0.9",   # nested section
        "run.name=a=b",                    # only the first '=' splits
        "logging.peak_tflops=989",         # Optional[float] from an int
        "schedule.min_lr_ratio=1",         # float field from an int
    ])
    assert cfg.parallel.tp == 2 and type(cfg.parallel.tp) is int
    assert cfg.optimizer.lr == 3e-4 and type(cfg.optimizer.lr) is float
    assert cfg.optimizer.weight_decay == 0.1
    assert cfg.model.tie_embeddings is True
    assert cfg.train.eval_every == 0
    assert cfg.distill.dt0 == 1 / 512
    assert cfg.distill.temperature.start == 0.9 and cfg.distill.temperature.step == Config().distill.temperature.step
    assert cfg.run.name == "a=b"
    assert cfg.logging.peak_tflops == 989.0 and type(cfg.logging.peak_tflops) is float
    assert cfg.schedule.min_lr_ratio == 1.0 and type(cfg.schedule.min_lr_ratio) is float
    cfg = load_config([], ["logging.peak_tflops=989", "logging.peak_tflops=null", "model.tie_embeddings=no"])
    assert cfg.logging.peak_tflops is None and cfg.model.tie_embeddings is False


def test_fraction_in_yaml_file(tmp_path):
    path = _write(tmp_path, "f.yaml", "distill:\n  dt0: 1/256\n")
    assert load_config([path]).distill.dt0 == 1 / 256
    assert eval_fraction(" 3/4 ") == 0.75 and eval_fraction("1e-3") == 1e-3


def test_resolved_yaml_round_trip(tmp_path):
    cfg = load_config([TINY], ["parallel.tp=2", "distill.dt0=1/3", "distill.temperature.floor=0.5",
                               "logging.peak_tflops=989.5", "train.precision=bf16", "run.name=round trip"])
    text = to_yaml(cfg)
    back = from_dict(yaml.safe_load(text))
    assert back == cfg and to_dict(back) == to_dict(cfg)
    assert back != Config()  # the comparison is not vacuous
    path = str(tmp_path / "run" / "config.resolved.yaml")
    save_resolved(cfg, path)
    assert load_config([path]) == cfg
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp." in f]  # no temp file left behind


def test_from_dict_validates():
    with pytest.raises(ConfigError, match="Did you mean 'zero_stage'"):
        from_dict({"parallel": {"zero_stag": 1}})
    with pytest.raises(ConfigError, match="'train.precision'"):
        from_dict({"train": {"precision": "fp8"}})


# --------------------------------------------------------------------------------------------
# The derived DeepSpeed dict
# --------------------------------------------------------------------------------------------
def test_deepspeed_dict_3d_bf16():
    cfg = load_config([], ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1", "parallel.micro_batch=4",
                           "parallel.global_batch=32", "train.precision=bf16", "optimizer.grad_clip=0.5",
                           "parallel.activation_checkpointing=true"])
    ds = deepspeed_config(cfg, 8)  # dp = 8 / (2*2) = 2
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 == 32 // (4 * 2)
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["bf16"] == {"enabled": True}
    assert ds["pipeline"] == {"activation_checkpoint_interval": 1}
    assert ds["gradient_clipping"] == 0.5


def test_deepspeed_dict_zero3_fp32_no_pipeline():
    cfg = load_config([], ["parallel.tp=2", "parallel.zero_stage=3", "parallel.micro_batch=2",
                           "parallel.global_batch=8", "parallel.offload_optimizer=true"])
    ds = deepspeed_config(cfg, 4)  # dp = 2, grad accum 2
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert "bf16" not in ds and "fp16" not in ds and "pipeline" not in ds


def test_deepspeed_dict_refuses_invalid_layout():
    cfg = load_config([], ["parallel.pp=2", "parallel.zero_stage=2"])
    with pytest.raises(ConfigError, match="two valid menus"):
        deepspeed_config(cfg, 2)


@pytest.mark.parametrize("tp, pp, world, micro, global_batch, stage", [
    (1, 1, 1, 4, 8, 0), (1, 1, 2, 4, 16, 2), (2, 1, 4, 2, 8, 3), (2, 2, 8, 1, 6, 1), (1, 2, 6, 3, 18, 0),
])
def test_deepspeed_accepts_derived_batch_sizes(monkeypatch, tp, pp, world, micro, global_batch, stage):
    """DeepSpeed's own config parser checks train_batch = micro x accum x dp: feed it our dict."""
    from deepspeed.runtime import config as ds_config

    cfg = load_config([], [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.micro_batch={micro}",
                           f"parallel.global_batch={global_batch}", f"parallel.zero_stage={stage}"])
    dp = world // (tp * pp)

    class MPU:  # DeepSpeedConfig reads the DP size from the mpu when torch.distributed is up
        def get_data_parallel_world_size(self):
            return dp

    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    parsed = ds_config.DeepSpeedConfig(deepspeed_config(cfg, world), mpu=MPU())
    assert parsed.world_size == dp
    assert parsed.train_batch_size == global_batch
    assert parsed.train_micro_batch_size_per_gpu == micro
    assert parsed.gradient_accumulation_steps == global_batch // (micro * dp)
    assert parsed.zero_optimization_stage == stage


# --------------------------------------------------------------------------------------------
# Shipped configs and the CLI
# --------------------------------------------------------------------------------------------
SHIPPED = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
WORLD_HINT = re.compile(r"^\s*#\s*world_size:\s*(\d+)\s*$", re.MULTILINE)


def _world_for(path: str, cfg: Config) -> int:
    with open(path, encoding="utf-8") as fh:
        hint = WORLD_HINT.search(fh.read())
    return int(hint.group(1)) if hint else cfg.parallel.tp * cfg.parallel.pp


def test_configs_exist():
    assert os.path.join(REPO, "configs", "tiny", "teacher.yaml") in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.relpath(p, REPO) for p in SHIPPED])
def test_shipped_config_loads_and_validates(path):
    cfg = load_config([path])
    world = _world_for(path, cfg)
    ds = deepspeed_config(cfg, world)  # runs validate_layout
    assert ds["train_batch_size"] == cfg.parallel.global_batch
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg


def test_world_size_hint_is_read(tmp_path):
    path = _write(tmp_path, "big.yaml", "# world_size: 16\nparallel:\n  tp: 2\n  micro_batch: 1\n"
                                        "  global_batch: 8\n")
    cfg = load_config([path])
    assert _world_for(path, cfg) == 16
    validate_layout(cfg, 16)


def _train_cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=REPO)
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    return subprocess.run([sys.executable, os.path.join(REPO, "mcd_scale", "train.py"), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_dry_run_valid_layout_prints_json():
    res = _train_cli("--config", TINY, "--set", "parallel.tp=2", "--set", "parallel.global_batch=32",
                     "--dry-run", "--layout-only", "--world-size", "8")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["ok"] is True and (out["world_size"], out["tp"], out["pp"], out["dp"]) == (8, 2, 1, 4)
    micro = load_config([TINY]).parallel.micro_batch
    assert out["grad_accum"] == 32 // (micro * 4)
    assert out["deepspeed"]["gradient_accumulation_steps"] == out["grad_accum"]
    assert out["deepspeed"]["train_batch_size"] == 32


def test_cli_dry_run_invalid_layout_exits_2_with_message():
    res = _train_cli("--config", TINY, "--set", "parallel.pp=2", "--set", "parallel.zero_stage=3",
                     "--dry-run", "--world-size", "2")
    assert res.returncode == EXIT_CONFIG == 2
    assert "config error" in res.stderr and "two valid menus" in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


# --------------------------------------------------------------------------------------------
# docs/config.md is generated and current
# --------------------------------------------------------------------------------------------
def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_config_docs", os.path.join(REPO, "tools", "dev", "gen_config_docs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_docs_up_to_date():
    gen = _gen_module()
    path = os.path.join(REPO, "docs", "config.md")
    assert os.path.isfile(path), "docs/config.md is missing: run `python tools/dev/gen_config_docs.py`"
    with open(path, encoding="utf-8") as fh:
        current = fh.read()
    assert current == gen.render(), "docs/config.md is out of date: run `python tools/dev/gen_config_docs.py`"


def test_config_docs_cover_every_field():
    from mcd_scale.config import field_docs

    text = _gen_module().render()
    for key in field_docs():
        assert f"`{key}`" in text, f"{key} missing from the generated reference"
    assert "(a) 3D" in text and "(b) TP x DP" in text


def test_bare_off_is_the_word_where_it_is_a_choice():
    """YAML reads `off` as False; for a field whose choices include 'off' it means the word."""
    from mcd_scale.config import load_config as _load

    assert _load([], ["distill.temperature.schedule=off"]).distill.temperature.schedule == "off"


# --------------------------------------------------------------------------------------------
# Decided GPU defaults (docs/performance.md "Decided GPU defaults") in the derived dicts
# --------------------------------------------------------------------------------------------
ONE_B = {"teacher_1b.yaml": 8, "distill_1b.yaml": 16}


@pytest.mark.parametrize("name", sorted(ONE_B))
def test_one_b_configs_derive_the_decided_gpu_defaults(monkeypatch, name):
    from deepspeed.runtime import config as ds_config

    from mcd_scale.training.optim import adamw_options

    cfg = load_config([os.path.join(REPO, "configs", name)])
    world = ONE_B[name]
    ds = deepspeed_config(cfg, world)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    # The largest 1-D parameter of the TP shard persists (fc1 bias, ffn/tp), so no norm/bias is gathered.
    assert zero["stage3_param_persistence_threshold"] == cfg.model.ffn_hidden // cfg.parallel.tp == 4096
    assert zero["reduce_bucket_size"] == zero["stage3_prefetch_bucket_size"] == 50_000_000
    assert ds["bf16"] == {"enabled": True} and ds["communication_data_type"] == "fp32"
    assert cfg.parallel.activation_checkpointing is False  # the memory plan fits without it
    assert adamw_options(cfg, "cuda")["fused"] is True
    assert "fused" not in adamw_options(cfg, "cpu")  # CPU keeps the single-tensor AdamW

    class MPU:
        def get_data_parallel_world_size(self):
            return world // cfg.parallel.tp

    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    parsed = ds_config.DeepSpeedConfig(ds, mpu=MPU())  # DeepSpeed accepts every key under its own names
    import torch

    assert parsed.communication_data_type == torch.float32
    assert parsed.zero_config.overlap_comm and parsed.zero_config.param_persistence_threshold == 4096
    assert parsed.zero_config.reduce_bucket_size == parsed.zero_config.prefetch_bucket_size == 50_000_000


def test_gpu_default_keys_are_validated_and_reach_the_dict():
    assert "'parallel.reduce_dtype'" in _err(["parallel.reduce_dtype=fp16"])
    assert "'parallel.zero3_persistence_threshold'" in _err(["parallel.zero3_persistence_threshold=-2"])
    assert "'parallel.reduce_bucket_elements'" in _err(["parallel.reduce_bucket_elements=0"])
    cfg = load_config([], ["parallel.zero_stage=3", "train.precision=bf16", "parallel.reduce_dtype=bf16",
                           "parallel.overlap_comm=false", "parallel.zero3_persistence_threshold=0"])
    ds = deepspeed_config(cfg, 1)
    assert ds["communication_data_type"] == "bf16" and ds["zero_optimization"]["overlap_comm"] is False
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    # fp32 training and ZeRO-0/1 do not carry ZeRO-2/3 keys or a reduction dtype.
    plain = deepspeed_config(load_config([], ["parallel.zero_stage=1"]), 1)
    assert "communication_data_type" not in plain and set(plain["zero_optimization"]) == {"stage"}


def test_build_optimizer_is_plain_adamw_on_cpu():
    import torch

    from mcd_scale.training.optim import build_optimizer

    cfg = load_config([], ["parallel.fused_optimizer=true", "optimizer.lr=0.01"])
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))], torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults["fused"] and opt.defaults["lr"] == 0.01


# --------------------------------------------------------------------------------------------
# Numeric ranges: every number means something
# --------------------------------------------------------------------------------------------
def _leaf_types() -> dict:
    import dataclasses
    import typing

    out = {}

    def visit(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                visit(tp, prefix + f.name + ".")
            else:
                args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
                out[prefix + f.name] = args[0]

    visit(Config, "")
    return out


def test_every_numeric_field_has_a_range_holding_its_default():
    from mcd_scale.config import RANGES, get_field

    leaves = _leaf_types()
    numeric = {k for k, tp in leaves.items() if tp in (int, float)}
    assert numeric - set(RANGES) == set(), "numeric fields without a range in mcd_scale/config/schema.py RANGES"
    assert set(RANGES) - numeric == set(), "RANGES names a field that is not numeric (or does not exist)"
    defaults = Config()
    for key, rng in RANGES.items():
        value = get_field(defaults, key)
        assert value is None or rng.contains(value), (key, value, rng)


def test_range_ends_and_non_finite_values():
    from mcd_scale.config import Range

    closed, open_ = Range(0.0, 1.0), Range(0.0, 1.0, lo_open=True, hi_open=True)
    assert closed.contains(0.0) and closed.contains(1.0) and not open_.contains(0.0) and not open_.contains(1.0)
    assert open_.contains(0.5) and not closed.contains(-1e-12) and not closed.contains(1.0 + 1e-12)
    for bad in (float("inf"), float("-inf"), float("nan")):
        assert not Range(-1e308, 1e308).contains(bad)
    assert Range(0, 2 ** 63 - 1).contains(2 ** 63 - 1) and not Range(0, 2 ** 63 - 1).contains(10 ** 400)
    assert closed.text() == "[0, 1]" and open_.text() == "(0, 1)" and Range(0.0, 1e-3, lo_open=True).text() == "(0, 0.001]"


MEANINGLESS = [  # accepted by train.py --dry-run before the ranges (docs/config.md lists every range)
    ("optimizer.lr=-1", "'optimizer.lr' must be in (0, 10], got -1.0"),
    ("optimizer.lr=1e20", "'optimizer.lr' must be in (0, 10], got 1e+20"),
    ("model.norm_eps=inf", "'model.norm_eps' must be in (0, 1], got inf"),
    ("model.norm_eps=1e309", "'model.norm_eps' must be in (0, 1], got inf"),
    ("run.dir=", "'run.dir' is empty"),
    ("train.steps=0", "'train.steps' must be in [1, 1099511627776], got 0"),
]


@pytest.mark.parametrize("override, message", MEANINGLESS)
def test_meaningless_values_are_refused_in_one_line(override, message, capsys):
    from mcd_scale.train import main

    assert main(["--config", TINY, "--set", override, "--dry-run", "--layout-only", "--world-size", "2"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and captured.out == "", captured


def test_meaningless_value_through_the_real_cli_exits_2_without_traceback():
    res = _train_cli("--config", TINY, "--set", "optimizer.lr=-1", "--dry-run", "--world-size", "2")
    assert res.returncode == EXIT_CONFIG and res.stdout == ""
    assert res.stderr.strip().count("\n") == 0 and "'optimizer.lr' must be in (0, 10]" in res.stderr
