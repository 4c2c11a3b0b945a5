"""Universal (layout-independent) training checkpoints: resume at another TP / DP / ZeRO layout.

A DeepSpeed checkpoint holds the optimizer state partitioned for the layout that wrote it, so it can
only be resumed by that layout. With ``checkpoint.universal: true`` every checkpoint also gets
``universal.safetensors``: for every parameter its fp32 master weight and Adam's two moments as full
logical tensors (keys ``fp32/<name>``, ``exp_avg/<name>``, ``exp_avg_sq/<name>``), gathered exactly
like ``model.safetensors`` (TP shards concatenated, ZeRO partitions gathered, pipeline stages sent to
rank 0), plus Adam's step count and the LR-schedule position (``meta/adam_step``, ``meta/lr_epoch``).

A run whose layout differs from the checkpoint's (:func:`layout_of`) resumes from that file
(:func:`load_universal`): weights and fp32 masters, both moments, Adam's step count, the LR schedule
and DeepSpeed's step counters. The data cursor is the layout-independent ``train_state.json``. What does
not carry over: the per-rank RNG streams (dropout; the data and corruption draws are keyed by sample
id, not by rank). The EMA shadow moves too when the file holds it (keys ``ema/<name>``, fp32; written
by runs with ``train.ema_decay > 0`` and by ``tools/convert_ckpt.py reshard``); a file without it is
refused for an EMA run with the fix named. A tag whose COMPLETE says ``universal_only`` (reshard's
output: no DeepSpeed files) resumes through this file at every layout. Resuming the same
layout never reads this file.

Order of a universal resume (why): weights first, as the engine's initial state, because DeepSpeed
builds its fp32 partitions from the module's parameters; then Adam's state tensors are created (torch
creates them lazily at the first step) and DeepSpeed's views into them linked; then the fp32 masters
and moments are written through DeepSpeed's ``safe_set_full_*`` API, which knows every ZeRO stage's
partitioning.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import torch
import yaml
from safetensors import safe_open

from mcd_scale.parallel import collectives

FILE = "universal.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")
EMA_PREFIX = "ema"  # the EMA shadow (fp32), present when the run has train.ema_decay > 0
UNIVERSAL_ONLY = "universal_only"  # COMPLETE key of a tag that holds no DeepSpeed files (convert_ckpt reshard)


def layout_of(parallel: Any, precision: str, world_size: int) -> dict:
    """What a DeepSpeed checkpoint's optimizer files depend on."""
    return {"world_size": int(world_size), "tp": int(parallel.tp), "pp": int(parallel.pp),
            "zero_stage": int(parallel.zero_stage), "precision": str(precision)}


def saved_layout(checkpoint_dir: str) -> dict:
    """The layout that wrote ``checkpoint_dir`` (its config.resolved.yaml and COMPLETE marker)."""
    with open(os.path.join(checkpoint_dir, "config.resolved.yaml"), encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    with open(os.path.join(checkpoint_dir, "COMPLETE"), encoding="utf-8") as fh:
        world = json.load(fh)["world_size"]
    par = cfg["parallel"]
    out = {"world_size": int(world), "tp": int(par["tp"]), "pp": int(par["pp"]),
           "zero_stage": int(par["zero_stage"]), "precision": str(cfg["train"]["precision"])}
    if _marker(checkpoint_dir).get(UNIVERSAL_ONLY):
        # No DeepSpeed files (tools/convert_ckpt.py reshard): no layout can load it natively, so it reports a
        # world size no launch has and every resume goes through the universal file.
        out["world_size"] = 0
        out[UNIVERSAL_ONLY] = True
    return out


def _marker(checkpoint_dir: str) -> dict:
    with open(os.path.join(checkpoint_dir, "COMPLETE"), encoding="utf-8") as fh:
        return json.load(fh)


def native_resume_ok(saved: dict, here: dict) -> bool:
    """DeepSpeed loads its own checkpoint across a layout change only for fp32 ZeRO-0 with another DP size
    (its optimizer file is per TP/PP rank, not per DP rank); everything else needs the universal file."""
    if saved.get(UNIVERSAL_ONLY):
        return False
    changed = {k for k in here if saved[k] != here[k]}
    return changed <= {"world_size"} and here["zero_stage"] == 0 and here["precision"] == "fp32"


def _inner_optimizer(ds_engine):
    """The torch AdamW that owns the state (DeepSpeed's ZeRO / bf16 wrappers keep it as ``.optimizer``)."""
    opt = ds_engine.optimizer
    return getattr(opt, "optimizer", opt)


def _ds_managed(param) -> bool:
    """True when DeepSpeed keeps this parameter's fp32 master and moments in its own partitions. (ZeRO-1/2
    set ``_hp_mapping`` on every parameter, None where this rank holds no fragment of it: the gather is
    still collective, so the attribute's presence decides, never its value.)"""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _step_and_epoch(ds_engine) -> tuple[int, int]:
    inner = _inner_optimizer(ds_engine)
    steps = [int(st["step"]) for st in inner.state.values() if "step" in st]
    sched = ds_engine.lr_scheduler
    return (max(steps) if steps else 0), (int(sched.last_epoch) if sched is not None else 0)


def local_getters(ds_engine, ema=None, dims=None) -> list[tuple[str, Callable]]:
    """(key prefix, local_of) pairs of the universal file: for a parameter, this TP rank's whole fp32 master,
    each Adam moment, and (``ema`` given) the EMA shadow. Collective under ZeRO-3 (gathers over DP)."""
    # lazy: loads deepspeed; importing this module does not need it
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    inner = _inner_optimizer(ds_engine)

    def master(p):
        return (safe_get_full_fp32_param(p) if _ds_managed(p) else p.data).detach().float().clone()

    def moment(key):
        def get(p):
            if _ds_managed(p):
                return safe_get_full_optimizer_state(p, key).detach().float().clone()
            st = inner.state.get(p, {})
            return (st[key] if key in st else torch.zeros_like(p)).detach().float().clone()
        return get

    out = [("fp32", master), *((k, moment(k)) for k in MOMENTS)]
    if ema is not None:
        out.append((EMA_PREFIX, ema_getter(ema, dims)))
    return out


def ema_getter(ema, dims) -> Callable:
    """local_of for the EMA shadow: this TP rank's whole fp32 tensor (the ZeRO-3 partitions of the shadow,
    which are laid out like the parameter's ``ds_tensor``, are all-gathered over the DP group)."""
    index = {id(p): i for i, p in enumerate(ema.params)}

    def get(p):
        shadow = ema.shadow[index[id(p)]]
        if getattr(p, "ds_tensor", None) is None:
            return shadow.detach().float().clone()
        parts = collectives.all_gather(shadow.detach().float(), group=dims.dp_group) if dims.dp > 1 else [shadow]
        return torch.cat([t.reshape(-1) for t in parts])[: p.ds_numel].view(p.ds_shape).clone()
    return get


def meta_tensors(ds_engine) -> dict[str, torch.Tensor]:
    step, epoch = _step_and_epoch(ds_engine)
    # host tensors: they go into a file, never into a collective
    return {"meta/adam_step": torch.tensor(step, dtype=torch.int64, device="cpu"),
            "meta/lr_epoch": torch.tensor(epoch, dtype=torch.int64, device="cpu")}


def gather_universal(train_engine, ema=None) -> dict[str, torch.Tensor]:
    """The universal state on global rank 0, {} elsewhere. Collective: every rank calls it."""
    # lazy: loads megatron; importing this module does not need it
    from mcd_scale.model.weights import full_state_dict

    out: dict[str, torch.Tensor] = {}
    for prefix, local_of in local_getters(train_engine.engine, ema, train_engine.dims):
        for name, t in full_state_dict(train_engine.module, train_engine.dims, local_of=local_of).items():
            out[f"{prefix}/{name}"] = t
    if out:
        out.update(meta_tensors(train_engine.engine))
    return out


def weights_of(path: str) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a universal file as a logical state dict (the engine's initial weights).
    Only these are read whole; the moments are read one tensor at a time by :func:`load_universal`, so a
    rank's peak is the fp32 model plus one tensor, not three fp32 models."""
    with safe_open(path, framework="pt") as fh:
        return {k.split("/", 1)[1]: fh.get_tensor(k) for k in fh.keys() if k.startswith("fp32/")}


@torch.no_grad()
def load_universal(train_engine, path: str, global_batch: int, train_step: int, ema=None,
                   ema_updates: int = 0) -> None:
    """Write fp32 masters, moments, Adam's step and the LR schedule of the universal file ``path`` into an
    engine of any layout whose weights were initialised from :func:`weights_of` (``TrainEngine(init_state=...)``);
    with ``ema``, its shadow too (re-sliced for this layout)."""
    with safe_open(path, framework="pt") as fh:
        _init_adam_state(train_engine.engine, int(fh.get_tensor("meta/adam_step")))
        _write_masters_and_moments(train_engine, fh)
        _set_schedule(train_engine.engine, int(fh.get_tensor("meta/lr_epoch")), global_batch, train_step)
        if ema is not None:
            _write_ema(train_engine, ema, fh)
            ema.num_updates = int(ema_updates)


def _write_ema(train_engine, ema, fh) -> None:
    """The shadow of each trainable parameter: this TP rank's slice, then (ZeRO-3) this DP rank's partition
    of its flattened, zero-padded form, the layout of the parameter's own ``ds_tensor``."""
    # lazy: loads megatron; importing this module does not need it
    from mcd_scale.model.logical import local_slice, logical_parameters

    dims = train_engine.dims
    tp_rank, tp = (dims.tp_rank, dims.tp) if dims is not None and dims.tp > 1 else (0, 1)
    index = {id(p): i for i, p in enumerate(ema.params)}
    for name, p in logical_parameters(train_engine.module):
        if id(p) not in index:
            continue
        shadow = ema.shadow[index[id(p)]]
        local = local_slice(fh.get_tensor(f"{EMA_PREFIX}/{name}"), p.tp_split_dim, tp_rank, tp).float()
        if getattr(p, "ds_tensor", None) is not None:
            flat, part = local.reshape(-1), shadow.numel()
            piece = flat[dims.dp_rank * part: (dims.dp_rank + 1) * part]
            shadow.zero_()
            shadow.view(-1)[: piece.numel()].copy_(piece.to(shadow.device))
        else:
            shadow.copy_(local.to(shadow.device))


def _init_adam_state(ds, step: int) -> None:
    """Adam creates its state lazily at the first step; create it now so the moments have a home. Its keys
    are the tensors the optimizer steps: the fp32 partitions under ZeRO (stage 3 swaps its flat groups
    into param_groups only during step), the parameters themselves otherwise."""
    inner = _inner_optimizer(ds)
    keys = {id(p): p for group in inner.param_groups for p in group["params"]}
    keys.update({id(p): p for p in getattr(ds.optimizer, "fp32_partitioned_groups_flat", [])})
    on_device = any(g.get("fused") or g.get("capturable") for g in inner.param_groups)
    for p in keys.values():
        st = inner.state[p]
        # Where torch's Adam keeps 'step': with its parameter when fused/capturable, on the host otherwise.
        st["step"] = torch.tensor(float(step), device=p.device if on_device else "cpu")
        for key in MOMENTS:
            st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if hasattr(ds.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 and bf16: link the views
        ds.optimizer._hp_optimizer_states_linked = False
        ds.optimizer._lazy_init_hp_params_optimizer_state()


def _write_masters_and_moments(train_engine, fh) -> None:
    # lazy: loads deepspeed; importing this module does not need it
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from mcd_scale.model.logical import local_slice, logical_parameters

    dims, inner = train_engine.dims, _inner_optimizer(train_engine.engine)
    tp_rank, tp = (dims.tp_rank, dims.tp) if dims is not None and dims.tp > 1 else (0, 1)
    for name, p in logical_parameters(train_engine.module):
        def local(prefix):  # one tensor read at a time
            return local_slice(fh.get_tensor(f"{prefix}/{name}"), p.tp_split_dim, tp_rank, tp).to(p.device).float()

        if _ds_managed(p):
            safe_set_full_fp32_param(p, local("fp32"))
            for key in MOMENTS:
                safe_set_full_optimizer_state(p, local(key), key)
        else:  # ZeRO-0 fp32: the parameter is its own master, the state is keyed by it
            p.data.copy_(local("fp32").to(p.dtype))
            for key in MOMENTS:
                inner.state[p][key].copy_(local(key))


def _set_schedule(ds, epoch: int, global_batch: int, train_step: int) -> None:
    sched, inner = ds.lr_scheduler, _inner_optimizer(ds)
    if sched is not None:
        sched.last_epoch = epoch
        lrs = sched.get_lr()
        for g, lr in zip(inner.param_groups, lrs):
            g["lr"] = lr
        sched._last_lr = list(lrs)
    ds.global_steps = train_step
    ds.global_samples = train_step * global_batch


def has_ema(path: str) -> bool:
    with safe_open(path, framework="pt") as fh:
        return any(k.startswith(EMA_PREFIX + "/") for k in fh.keys())


def refuse_reason(cfg, path: Optional[str] = None) -> Optional[str]:
    """Why this run cannot resume universally from ``path`` (None if it can)."""
    if cfg.train.ema_decay > 0 and (path is None or not has_ema(path)):
        return (f"{path or FILE} holds no EMA shadow (written before EMA was saved in it); rebuild it from the "
                f"DeepSpeed shards with 'tools/convert_ckpt.py reshard', resume at the saved layout, or set "
                f"train.ema_decay: 0")
    return None
