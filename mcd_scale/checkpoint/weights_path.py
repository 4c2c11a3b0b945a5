"""The one rule that turns a path a user passes into a checkpoint's weights file or its checkpoint directory.

Every tool that reads a trained model goes through here: ``tools/sample.py``/``evaluate.py`` and the demo
(``--checkpoint``, :func:`mcd_scale.inference.resolve_weights`), the teacher of precompute, training and the
round driver (``--teacher`` / ``distill.teacher``, :func:`mcd_scale.distill.checkpoints.resolve_teacher_file`),
and ``tools/convert_ckpt.py`` (inspect, export, consolidate, reshard, export-hf). What a user may pass
(docs/checkpoints.md, "Which path"):

- a run directory: its ``checkpoints/latest`` tag;
- a checkpoints directory (whatever its name): the tag its ``latest`` file names;
- the ``latest`` file itself: the same;
- one checkpoint (``step_N``, with its ``COMPLETE`` marker);
- for the weights only: an exported directory (``convert_ckpt.py export``/``consolidate``/``export-hf``: the
  weights file at its top) or a ``.safetensors`` file. The conversion tools need a checkpoint directory (its
  TrainState, resolved config and integrity record), so they refuse those with the fix.

A ``latest`` that names a missing or incomplete tag is refused (checkpoints are verified on read), as is any other
file than ``.safetensors`` (nothing pickled is ever loaded). Every refusal is one input error (exit 2) naming the
path, the flag or field it came from (``what``) and the fix.
"""
from __future__ import annotations

import os
from typing import Optional

from mcd_scale.checkpoint.integrity import MARKER
from mcd_scale.checkpoint.store import list_tags, read_latest
from mcd_scale.errors import InputError, MissingCheckpoint

WEIGHT_FILES = {"model": "model.safetensors", "ema": "model_ema.safetensors"}
LATEST = "latest"
ACCEPTED = ("a run directory, its checkpoints directory, one checkpoint (step_N), an exported directory or a "
            ".safetensors file")
ACCEPTED_DIRS = "a run directory, its checkpoints directory or one checkpoint (step_N)"


def _label(what: str, path: str) -> str:
    return f"{what} {path}" if what else path


def _start(path: str, what: str, accepted: str) -> str:
    """``path`` with a ``latest`` file standing for the directory that holds it; refuses an empty path."""
    if not path:
        raise MissingCheckpoint(f"{what.rstrip(' =') or 'the checkpoint path'} is empty: set it to {accepted}")
    if os.path.basename(os.path.normpath(path)) == LATEST and os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    return path


def _tag_dir(root: str, what: str, path: str) -> Optional[str]:
    """The complete checkpoint ``root`` designates: itself (its ``COMPLETE`` marker), the tag its ``latest``
    names, or None when it holds neither."""
    if os.path.isfile(os.path.join(root, MARKER)):
        return root
    try:
        tag = read_latest(root, fix=f"pass one of the complete checkpoints {list_tags(root) or '(none)'} instead")
    except MissingCheckpoint as exc:
        raise MissingCheckpoint(f"{_label(what, path)}: {exc}") from None
    return None if tag is None else os.path.join(root, tag)


def weights_in(tag_dir: str, which: str = "model", what: str = "", path: str = "") -> str:
    """The ``which`` weights file of a complete checkpoint directory, or the error saying why it is absent
    (prefixed with ``what`` and ``path``, the flag or field and what the user passed, when given)."""
    file = os.path.join(tag_dir, WEIGHT_FILES[which])
    if os.path.isfile(file):
        return file
    why = "saved with checkpoint.consolidated: false"
    if which == "ema":
        why = f"trained without EMA (train.ema_decay: 0), or {why}"
    prefix = _label(what, path) + ": " if what or path else ""
    raise MissingCheckpoint(f"{prefix}{file} is missing ({why}); build it from the DeepSpeed "
                            f"shards with 'tools/convert_ckpt.py consolidate'")


def resolve_weights_path(path: str, which: str = "model", what: str = "--checkpoint") -> str:
    """The weights file (``model.safetensors``; ``which='ema'``: ``model_ema.safetensors``) that ``path``
    designates (module docstring). ``what`` names the flag or field in the error (e.g. ``--checkpoint``,
    ``'distill.teacher' =``). A ``.safetensors`` file is returned as given, whichever ``which``."""
    if which not in WEIGHT_FILES:
        raise InputError(f"{what + ': ' if what else ''}weights {which!r}: choose one of {', '.join(WEIGHT_FILES)}")
    path = _start(path, what, ACCEPTED)
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise InputError(f"{_label(what, path)}: expected a .safetensors file or {ACCEPTED}; pickled checkpoints "
                             f"are never loaded")
        return path
    if not os.path.isdir(path):
        raise MissingCheckpoint(f"{_label(what, path)} does not exist; pass {ACCEPTED}")
    name = WEIGHT_FILES[which]
    for root in (path, os.path.join(path, "checkpoints")):
        if os.path.isfile(os.path.join(root, name)):  # a checkpoint, an exported directory
            return os.path.join(root, name)
        tag_dir = _tag_dir(root, what, path)
        if tag_dir is not None:
            return weights_in(tag_dir, which, what, path)
    raise MissingCheckpoint(f"{_label(what, path)}: no {name}, COMPLETE marker or '{LATEST}' file there or in "
                            f"{os.path.join(path, 'checkpoints')}; pass {ACCEPTED} (train first?)")


def resolve_checkpoint_dir(path: str, what: str = "") -> str:
    """The complete checkpoint directory (one tag) that ``path`` designates: what the conversion tools read
    (TrainState, resolved config, integrity record, DeepSpeed shards)."""
    path = _start(path, what, ACCEPTED_DIRS)
    if os.path.isfile(path):
        raise InputError(f"{_label(what, path)} is a file; pass {ACCEPTED_DIRS} (e.g. {os.path.dirname(path) or '.'})")
    if not os.path.isdir(path):
        raise MissingCheckpoint(f"{_label(what, path)} does not exist; pass {ACCEPTED_DIRS}")
    for root in (path, os.path.join(path, "checkpoints")):
        tag_dir = _tag_dir(root, what, path)
        if tag_dir is not None:
            return tag_dir
    raise MissingCheckpoint(f"{_label(what, path)} is not a run directory, checkpoints directory or checkpoint (no "
                            f"COMPLETE marker or '{LATEST}' file found)")
