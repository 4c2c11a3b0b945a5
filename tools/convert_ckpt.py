#!/usr/bin/env python
"""Inspect and export mcd_scale checkpoints.

    python tools/convert_ckpt.py inspect RUN_OR_CKPT [--json]
    python tools/convert_ckpt.py export RUN_OR_CKPT --out DIR [--ema] [--force]

``inspect`` lists the checkpoints of a run (tags, ``latest``), the TrainState, the parallel layout and
precision that wrote them, whether it is universal (resumable at another layout: checkpoint.universal), and the logical tensors of the consolidated weights with the parameter count.
``export`` writes a self-contained directory: ``model.safetensors`` (layout-independent logical
weights: they load into ANY TP/PP/ZeRO layout through ``load_full_state_dict``, which is how a
teacher trained at TP=2 becomes a TP=1 student or a PP=2 sampler) plus ``config.yaml`` (the model
section and the rest of the resolved config) and ``meta.json`` (source, digest, step).
Nothing is unpickled; only safetensors, YAML and JSON are read, and every file read is first checked
against the checkpoint's integrity record (size + sha256 in COMPLETE; mcd_scale/integrity.py).

``export`` never deletes what it did not create: a non-empty ``--out`` is refused unless ``--force``,
and ``--force`` only replaces the files listed in that directory's ``meta.json`` (the manifest a
previous export wrote); a directory without that manifest (a run, anything else) is always refused.
Input errors are one line, exit 2 (mcd_scale/cli.py; MCD_DEBUG=1 shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcd_scale.cli import InputError, input_errors_exit  # noqa: E402
from mcd_scale.integrity import IntegrityError, sha256_file, verify  # noqa: E402

EXPORT_FORMAT = "mcd_scale-export-v1"


def _checkpoint_dir(path: str) -> str:
    """A complete checkpoint directory from a run dir, checkpoints root or checkpoint dir."""
    for root in (path, os.path.join(path, "checkpoints")):
        if os.path.exists(os.path.join(root, "COMPLETE")):
            return root
        latest = os.path.join(root, "latest")
        if os.path.isfile(latest):
            with open(latest, encoding="utf-8") as fh:
                return os.path.join(root, fh.read().strip())
    raise InputError(f"{path} is not a run directory, checkpoints directory or checkpoint "
                     f"(no COMPLETE marker or 'latest' file found)")


def _check_safetensors(path: str) -> None:
    """A header that parses and a data section of the size it declares (catches truncation even for
    a checkpoint written before integrity records)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as st:
            for key in st.keys():
                st.get_slice(key)
    except Exception as exc:  # SafetensorError has no importable base across versions
        raise IntegrityError(f"{path} is not a readable safetensors file ({' '.join(str(exc).split())}); restore "
                             f"it from a copy of the run or use another checkpoint") from None


def inspect(path: str) -> dict:
    import yaml
    from safetensors import safe_open

    from mcd_scale.checkpoint import list_tags

    ckpt = _checkpoint_dir(path)
    root = os.path.dirname(ckpt)
    info: dict = {"checkpoint": ckpt, "tags": list_tags(root), "integrity": verify(ckpt)}
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
        _check_safetensors(f)
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


def _own_files(out: str) -> list[str]:
    """The files a previous export wrote into ``out`` (its meta.json manifest), or an InputError."""
    meta = os.path.join(out, "meta.json")
    try:
        with open(meta, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT or not isinstance(data.get("files"), dict):
        raise InputError(f"--out {out} is not empty and was not written by convert_ckpt export (no {EXPORT_FORMAT} "
                         f"meta.json): nothing removed; choose an empty or new directory")
    return [name for name in data["files"] if os.path.basename(name) == name] + ["meta.json"]


def export(path: str, out: str, ema: bool, force: bool = False) -> str:
    import yaml

    ckpt = _checkpoint_dir(path)
    name = "model_ema.safetensors" if ema else "model.safetensors"
    src = os.path.join(ckpt, name)
    if not os.path.exists(src):
        raise InputError(f"{src} is missing (saved with checkpoint.consolidated: false"
                         f"{' or without EMA (train.ema_decay: 0)' if ema else ''}); re-save with consolidation on")
    replaced: list[str] = []
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise InputError(f"--out {out} is not empty: choose an empty or new directory, or pass --force to "
                             f"replace the files of a previous export there (nothing else is ever removed)")
        replaced = _own_files(out)
    elif os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out} is a file: choose a directory")
    verify(ckpt, [name, "config.resolved.yaml", "train_state.json"])  # before reading any of them
    _check_safetensors(src)
    with open(os.path.join(ckpt, "config.resolved.yaml"), encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    with open(os.path.join(ckpt, "train_state.json"), encoding="utf-8") as fh:
        step = json.load(fh)["step"]
    os.makedirs(out, exist_ok=True)
    for old in replaced:  # only what a previous export listed as its own; meta.json goes first so a
        target = os.path.join(out, old)  # half-replaced directory is never taken for a finished export
        if old == "meta.json" and os.path.isfile(target):
            os.remove(target)
    for old in replaced:
        target = os.path.join(out, old)
        if old != "meta.json" and os.path.isfile(target):
            os.remove(target)
    written: dict[str, dict] = {}

    def place(rel: str, write) -> None:  # write to a temp name, then rename: no half-written final name
        tmp = os.path.join(out, f".{rel}.tmp.{os.getpid()}")
        write(tmp)
        os.replace(tmp, os.path.join(out, rel))
        written[rel] = {"size": os.path.getsize(os.path.join(out, rel)), "sha256": sha256_file(os.path.join(out, rel))}

    import shutil

    place("model.safetensors", lambda tmp: shutil.copyfile(src, tmp))

    def write_yaml(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            yaml.safe_dump(cfg, fh, sort_keys=False)

    place("config.yaml", write_yaml)
    # sample.py and distill.teacher look for the resolved config beside the weights
    place("config.resolved.yaml", write_yaml)
    meta = {"format": EXPORT_FORMAT, "weights_format": "mcd_scale-logical-v1", "source": os.path.abspath(src),
            "step": step, "ema": ema, "sha256": written["model.safetensors"]["sha256"], "files": written}
    tmp = os.path.join(out, f".meta.json.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)
    os.replace(tmp, os.path.join(out, "meta.json"))  # last: its presence means the export is complete
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
    pe.add_argument("--force", action="store_true",
                    help="replace the files of a previous export in --out (never anything else)")
    args = p.parse_args(argv)
    with input_errors_exit("convert_ckpt"):
        return _run(args)


def _run(args) -> int:
    if args.cmd == "inspect":
        info = inspect(args.path)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(f"checkpoint  {info['checkpoint']}")
            print(f"tags        {', '.join(info['tags'])}")
            print(f"integrity   {info['integrity']}")
            print(f"step        {info['train_state']['step']}  consumed samples {info['train_state']['consumed_samples']}")
            print(f"layout      {info['layout']}")
            for name in ("model.safetensors", "model_ema.safetensors"):
                if name in info:
                    print(f"{name:<22}{info[name]['tensors']} tensors, {info[name]['parameters']:,} parameters")
        return 0
    print(export(args.path, args.out, args.ema, args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
