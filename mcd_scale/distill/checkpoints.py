"""Find and load a teacher's layout-independent weights (``model.safetensors``).

Accepted forms of ``distill.teacher`` (so a user can point at whatever they have) are those of every tool that
reads a trained model (:mod:`mcd_scale.checkpoint.weights_path`, docs/checkpoints.md): a ``.safetensors`` file; a
checkpoint directory (``.../checkpoints/step_000600``); a checkpoints root (``.../checkpoints``, its ``latest`` is
used) or its ``latest`` file; a run directory (``runs/x``, its ``checkpoints/latest``); or an exported directory.
Loading never unpickles anything.
"""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from mcd_scale.checkpoint.integrity import sha256_file, verify_file
from mcd_scale.checkpoint.weights_path import resolve_weights_path


def resolve_teacher_file(path: str, what: str = "'distill.teacher' =") -> str:
    """The teacher's model.safetensors that ``path`` designates (:mod:`mcd_scale.checkpoint.weights_path`: a run,
    checkpoints or checkpoint directory, an export or a .safetensors file); an input error (a
    FileNotFoundError too when nothing is there) names ``what`` (the flag or field) and the fix."""
    return resolve_weights_path(path, "model", what)


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
