"""Find and load a teacher's layout-independent weights (``model.safetensors``).

Accepted forms of ``distill.teacher`` (so a user can point at whatever they have):
a ``.safetensors`` file; a checkpoint directory (``.../checkpoints/step_000600``); a checkpoints root
(``.../checkpoints``, its ``latest`` is used); or a run directory (``runs/x``, its
``checkpoints/latest``). Loading never unpickles anything.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from mcd_scale.checkpoint.integrity import sha256_file, verify_file


def resolve_teacher_file(path: str) -> str:
    """The model.safetensors that `path` designates, or a clear FileNotFoundError."""
    if not path:
        raise FileNotFoundError("'distill.teacher' is empty: set it to the teacher's run directory, checkpoint "
                                "directory or model.safetensors file")
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"'distill.teacher' = {path}: expected a .safetensors file (convert other formats "
                             f"with tools/convert_ckpt.py); pickled checkpoints are never loaded")
        return path
    candidates = [path, os.path.join(path, "checkpoints")]
    for root in candidates:
        direct = os.path.join(root, "model.safetensors")
        if os.path.isfile(direct):
            return direct
        latest = os.path.join(root, "latest")
        if os.path.isfile(latest):
            with open(latest, encoding="utf-8") as fh:
                tag = fh.read().strip()
            f = os.path.join(root, tag, "model.safetensors")
            if os.path.isfile(f):
                return f
            raise FileNotFoundError(f"{latest} names {tag}, but {f} is missing: the teacher was saved with "
                                    f"'checkpoint.consolidated: false'; consolidate it with tools/convert_ckpt.py")
    raise FileNotFoundError(f"'distill.teacher' = {path}: no model.safetensors found there, in "
                            f"{os.path.join(path, 'checkpoints')}, or via a 'latest' file")


def load_teacher_weights(path: str) -> dict[str, torch.Tensor]:
    """The teacher's weights, verified first against its checkpoint's integrity record (IntegrityError
    names a truncated or altered file)."""
    file = resolve_teacher_file(path)
    verify_file(file)
    return load_file(file)


def teacher_digest(path: str) -> str:
    """sha256 of the teacher weights file (recorded in trajectory manifests and checked by readers)."""
    file = resolve_teacher_file(path)
    verify_file(file)  # IntegrityError (an input error) names a truncated or altered teacher file
    return sha256_file(file)
