#!/usr/bin/env python
"""Inspect and export mcd_scale checkpoints.

    python tools/convert_ckpt.py inspect RUN_OR_CKPT [--json]
    python tools/convert_ckpt.py export RUN_OR_CKPT --out DIR [--ema]

``inspect`` lists the checkpoints of a run (tags, ``latest``), the TrainState, the parallel layout and
precision that wrote them, whether it is universal (resumable at another layout: checkpoint.universal), and the logical tensors of the consolidated weights with the parameter count.
``export`` writes a self-contained directory: ``model.safetensors`` (layout-independent logical
weights: they load into ANY TP/PP/ZeRO layout through ``load_full_state_dict``, which is how a
teacher trained at TP=2 becomes a TP=1 student or a PP=2 sampler) plus ``config.yaml`` (the model
section and the rest of the resolved config) and ``meta.json`` (source, digest, step).
Nothing is unpickled; only safetensors, YAML and JSON are read.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _checkpoint_dir(path: str) -> str:
    """A complete checkpoint directory from a run dir, checkpoints root or checkpoint dir."""
    for root in (path, os.path.join(path, "checkpoints")):
        if os.path.exists(os.path.join(root, "COMPLETE")):
            return root
        latest = os.path.join(root, "latest")
        if os.path.isfile(latest):
            with open(latest, encoding="utf-8") as fh:
                return os.path.join(root, fh.read().strip())
    raise SystemExit(f"convert_ckpt: {path} is not a run directory, checkpoints directory or checkpoint "
                     f"(no COMPLETE marker or 'latest' file found)")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inspect(path: str) -> dict:
    import yaml
    from safetensors import safe_open

    from mcd_scale.checkpoint import list_tags

    ckpt = _checkpoint_dir(path)
    root = os.path.dirname(ckpt)
    info: dict = {"checkpoint": ckpt, "tags": list_tags(root)}
    with open(os.path.join(ckpt, "train_state.json"), encoding="utf-8") as fh:
        info["train_state"] = json.load(fh)
    with open(os.path.join(ckpt, "config.resolved.yaml"), encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    with open(os.path.join(ckpt, "COMPLETE"), encoding="utf-8") as fh:
        world = json.load(fh).get("world_size")
    par = cfg.get("parallel", {})
    info["layout"] = {"world_size": world, "tp": par.get("tp"), "pp": par.get("pp"),
                      "zero_stage": par.get("zero_stage"), "precision": cfg.get("train", {}).get("precision"),
                      "objective": cfg.get("train", {}).get("objective")}
    # universal.safetensors (checkpoint.universal): the run can resume at any TP/PP/DP/ZeRO layout
    info["universal"] = os.path.exists(os.path.join(ckpt, "universal.safetensors"))
    for name in ("model.safetensors", "model_ema.safetensors"):
        f = os.path.join(ckpt, name)
        if not os.path.exists(f):
            continue
        with safe_open(f, framework="pt") as st:
            shapes = {k: list(st.get_slice(k).get_shape()) for k in st.keys()}
        count = 0
        for shape in shapes.values():
            n = 1
            for d in shape:
                n *= d
            count += n
        info[name] = {"tensors": len(shapes), "parameters": count, "shapes": shapes}
    return info


def export(path: str, out: str, ema: bool) -> str:
    import yaml

    ckpt = _checkpoint_dir(path)
    name = "model_ema.safetensors" if ema else "model.safetensors"
    src = os.path.join(ckpt, name)
    if not os.path.exists(src):
        raise SystemExit(f"convert_ckpt: {src} is missing (saved with checkpoint.consolidated: false"
                         f"{' or without EMA (train.ema_decay: 0)' if ema else ''}); re-save with consolidation on")
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shutil.copyfile(src, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(ckpt, "config.resolved.yaml"), encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    with open(os.path.join(ckpt, "train_state.json"), encoding="utf-8") as fh:
        step = json.load(fh)["step"]
    meta = {"source": os.path.abspath(src), "sha256": _sha256(src), "step": step, "ema": ema,
            "format": "mcd_scale-logical-v1"}
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)  # atomic: a half-written export never has the final name
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("inspect", help="summarise a run's checkpoints")
    pi.add_argument("path")
    pi.add_argument("--json", action="store_true", help="print the full JSON (with every tensor shape)")
    pe = sub.add_parser("export", help="write layout-independent weights + config to a directory")
    pe.add_argument("path")
    pe.add_argument("--out", required=True)
    pe.add_argument("--ema", action="store_true", help="export the EMA weights (distillation students)")
    args = p.parse_args(argv)
    if args.cmd == "inspect":
        info = inspect(args.path)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(f"checkpoint  {info['checkpoint']}")
            print(f"tags        {', '.join(info['tags'])}")
            print(f"step        {info['train_state']['step']}  consumed samples {info['train_state']['consumed_samples']}")
            print(f"layout      {info['layout']}")
            for name in ("model.safetensors", "model_ema.safetensors"):
                if name in info:
                    print(f"{name:<22}{info[name]['tensors']} tensors, {info[name]['parameters']:,} parameters")
        return 0
    print(export(args.path, args.out, args.ema))
    return 0


if __name__ == "__main__":
    sys.exit(main())
