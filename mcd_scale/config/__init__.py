"""One typed configuration tree for every stage of mcd_scale.

The tree is a set of dataclasses (one per section, :mod:`.schema`, with the valid choices and numeric ranges)
loaded from YAML files, later files overriding earlier ones, then ``--set section.key=value`` overrides
(:mod:`.load`). Everything is validated at parse time (:mod:`.validate`): unknown keys (with the nearest valid
name), wrong types, values outside their range, and the cross-field rules of the parallel layout
(:func:`validate_layout`). The DeepSpeed JSON is *derived* from this tree by
:func:`mcd_scale.parallel.deepspeed.deepspeed_config`; nobody writes it by hand. The resolved tree is written to
``<run.dir>/config.resolved.yaml`` and into every checkpoint.
"""
from mcd_scale.config.docs import field_docs
from mcd_scale.config.load import (eval_fraction, from_dict, load_config, save_resolved, to_dict, to_yaml)
from mcd_scale.config.schema import (CHOICES, NON_EMPTY, RANGES, CheckpointConfig, Config, DataConfig,
                                     DiffusionConfig, DistillConfig, DistributedConfig, LoggingConfig, ModelConfig,
                                     OptimizerConfig, ParallelConfig, Range, RunConfig, ScheduleConfig,
                                     TemperatureConfig, TrainConfig, round_dt)
from mcd_scale.config.validate import MENUS, get_field, grad_accum, validate_fields, validate_layout
from mcd_scale.errors import ConfigError

__all__ = ["CHOICES", "NON_EMPTY", "RANGES", "MENUS", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
           "DiffusionConfig", "DistillConfig", "DistributedConfig", "LoggingConfig", "ModelConfig", "OptimizerConfig",
           "ParallelConfig", "Range", "RunConfig", "ScheduleConfig", "TemperatureConfig", "TrainConfig",
           "eval_fraction", "field_docs", "from_dict", "get_field", "grad_accum", "load_config", "round_dt",
           "save_resolved", "to_dict", "to_yaml", "validate_fields", "validate_layout"]
