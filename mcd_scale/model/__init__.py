"""The teacher/student network: a TP/PP bidirectional transformer on megatron-core primitives.

Public API (see docs/model.md):
    DiffusionTransformer(model_cfg, tp_size=1, tp_group=None, *, dtype, activation_checkpointing, rng)
    build_model(cfg, dims=None, *, ds_config=None, dtype=None, init=True)
    build_pipeline_module(cfg, dims, loss_fn, *, dtype=None, init=True)       (mcd_scale.model.pipeline)
    gather_vocab_logits(logits_shard, tp_size, tp_group=None)
    init_weights(module, seed, std, tp_rank=0, tp_size=1)
    full_state_dict(module, dims=None) / load_full_state_dict(module, state, dims=None)
    save_safetensors(state, path, metadata=None) / load_safetensors(path)
    count_parameters(model_cfg) / train_flops_per_token(model_cfg)              (mcd_scale.model.flops)
"""
from mcd_scale.model.build import build_model, dropout_rng, model_dtype
from mcd_scale.model.init import init_weights
from mcd_scale.model.rng_tracker import DropoutRNG
from mcd_scale.model.tp_layers import gather_vocab_logits
from mcd_scale.model.transformer import DiffusionTransformer
from mcd_scale.model.weights import full_state_dict, load_full_state_dict, load_safetensors, save_safetensors

__all__ = ["DiffusionTransformer", "DropoutRNG", "build_model", "dropout_rng", "model_dtype", "init_weights",
           "gather_vocab_logits", "full_state_dict", "load_full_state_dict", "save_safetensors",
           "load_safetensors"]
