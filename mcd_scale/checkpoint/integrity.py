"""Integrity records of checkpoint tags: every file's size and sha256, checked before anything reads it.

A tag's ``COMPLETE`` marker is JSON ``{"tag", "world_size", "files": {relpath: {"size", "sha256"}}}``,
written by rank 0 once every rank has staged its files (:func:`record_files`). Readers call
:func:`verify` with the files they are about to read (or all of them) BEFORE opening them — in
particular before DeepSpeed's loader unpickles its ``.pt`` files, so a tampered or truncated file
is refused with its name instead of being unpickled. Hashing is streamed (1 MiB chunks); the size
check runs first, so a truncated file is refused without hashing it.

A marker without ``files`` (written before records existed) verifies as ``"unrecorded"``: the tag is
still loadable, and ``tools/convert_ckpt.py inspect`` says it is unverified.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

MARKER = "COMPLETE"
CHUNK = 1 << 20


from mcd_scale.errors import InputError


class IntegrityError(InputError):
    """A checkpoint file is missing, truncated or altered. The message names the file and the fix."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def record_files(ckpt_dir: str) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file under ``ckpt_dir`` except the marker itself."""
    out: dict[str, dict] = {}
    for dirpath, _dirs, files in os.walk(ckpt_dir):
        for name in sorted(files):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, ckpt_dir)
            if rel == MARKER:
                continue
            out[rel] = {"size": os.path.getsize(full), "sha256": sha256_file(full)}
    return dict(sorted(out.items()))


def read_marker(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, MARKER)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing: {ckpt_dir} is not a complete checkpoint; "
                             f"load another tag (tools/convert_ckpt.py inspect lists them)") from None
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{path} is unreadable ({exc}); load another tag or re-save") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path} is not a JSON object; load another tag or re-save")
    return data


def verify(ckpt_dir: str, names: Optional[Iterable[str]] = None) -> str:
    """Check ``names`` (relative paths; default: every recorded file) against the tag's record.

    Returns "ok" or "unrecorded" (an old marker without a file list); raises IntegrityError naming the
    first bad file. A name absent from the record is refused too (a file added after the save)."""
    record = read_marker(ckpt_dir).get("files")
    if record is None:
        return "unrecorded"
    wanted = list(record) if names is None else list(names)
    for rel in wanted:
        full = os.path.join(ckpt_dir, rel)
        entry = record.get(rel)
        if entry is None:
            raise IntegrityError(f"{full} is not in the integrity record of {ckpt_dir} (added after the save?); "
                                 f"remove it or load another tag")
        if not os.path.isfile(full):
            raise IntegrityError(f"{full} is missing (recorded {entry['size']} bytes); restore it from a copy of "
                                 f"the run or load another tag")
        size = os.path.getsize(full)
        if size != entry["size"]:
            raise IntegrityError(f"{full} is {size} bytes, its checkpoint recorded {entry['size']} (truncated or "
                                 f"altered); restore it from a copy of the run or load another tag")
        if sha256_file(full) != entry["sha256"]:
            raise IntegrityError(f"{full} does not match its recorded sha256 (corrupted or altered); restore it "
                                 f"from a copy of the run or load another tag")
    return "ok"


def verify_file(path: str) -> str:
    """Verify one file inside a checkpoint tag (its parent holds the marker); files outside a tag
    (e.g. an exported model.safetensors) are checked against ``meta.json`` when it records a digest."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(parent, MARKER)):
        return verify(parent, [os.path.basename(path)])
    meta = os.path.join(parent, "meta.json")
    if os.path.isfile(meta):
        try:
            with open(meta, encoding="utf-8") as fh:
                files = json.load(fh).get("files", {})
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"{meta} is unreadable ({exc}); re-export the model") from None
        entry = files.get(os.path.basename(path))
        if entry is not None:
            size = os.path.getsize(path) if os.path.isfile(path) else -1
            if size != entry["size"] or sha256_file(path) != entry["sha256"]:
                raise IntegrityError(f"{path} does not match {meta} (size {size} vs {entry['size']}, or sha256); "
                                     f"re-export it with tools/convert_ckpt.py")
            return "ok"
    return "unrecorded"
