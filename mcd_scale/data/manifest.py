"""Manifests: the ``manifest.json`` that says what made a shard set, and checks against it.

A consumer never guesses: it loads the manifest next to the shards and refuses a mismatch (wrong
seq_len, vocabulary, teacher digest, ...) with a message that names the file, the field, both
values and the fix. Manifests are written with sorted keys and no timestamps, so re-running a tool
with the same inputs reproduces the file byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from mcd_scale.errors import InputError

MANIFEST_NAME = "manifest.json"


class ManifestError(InputError):
    """A manifest is missing, unreadable, or does not match what the consumer expects."""


@dataclass(frozen=True)
class Expect:
    """What a consumer expects of one manifest field, and where that expectation comes from.

    ``name`` is the consumer-side name (e.g. ``"model.seq_len"``); ``fix`` is the remedy shown in
    the error (e.g. ``"re-run tools/prepare_data.py with --seq-len 128 or fix the config"``).
    """

    value: Any
    name: str = "the expected value"
    fix: str = ""


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed (shards can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def manifest_path(directory: str) -> str:
    return os.path.join(directory, MANIFEST_NAME)


def dumps_manifest(manifest: Mapping[str, Any]) -> str:
    """Canonical text of a manifest (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_manifest(directory: str, manifest: Mapping[str, Any]) -> str:
    """Atomically write ``directory/manifest.json``; returns its path. Written last by a tool, so a
    directory with a manifest is a complete shard set."""
    path = manifest_path(directory)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(dumps_manifest(manifest))
    os.replace(tmp, path)
    return path


def load_manifest(directory: str, tool_hint: str = "tools/prepare_data.py") -> dict:
    """Read ``directory/manifest.json``; a clear error if it is missing or not a JSON object."""
    path = manifest_path(directory)
    if not os.path.isfile(path):
        raise ManifestError(f"'{path}' does not exist: '{directory}' is not a finished shard set "
                            f"(run {tool_hint} --out {directory}, or fix the data path in the config)")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"'{path}' is unreadable: {exc} (re-run {tool_hint})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"'{path}' must hold a JSON object, got {type(manifest).__name__}")
    return manifest


def get_field(manifest: Mapping[str, Any], dotted: str, source: str) -> Any:
    """``manifest["a"]["b"]`` for ``"a.b"``; an error naming the file if a level is absent."""
    node: Any = manifest
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ManifestError(f"{source} has no field '{dotted}' (written by an older tool? re-create it)")
        node = node[part]
    return node


def check_manifest(manifest: Mapping[str, Any], expected: Mapping[str, Any], source: str) -> None:
    """Raise :class:`ManifestError` on the first field whose value differs from ``expected``.

    ``expected`` maps a (dotted) manifest field to an :class:`Expect` or a plain value; ``source``
    is the manifest's path, used in the message, e.g. ``"seq_len in data/prepared/manifest.json is
    64 but model.seq_len is 128; re-run tools/prepare_data.py with --seq-len 128 or fix the config"``.
    """
    for field, want in expected.items():
        exp = want if isinstance(want, Expect) else Expect(want)
        have = get_field(manifest, field, source)
        if have != exp.value:
            fix = f"; {exp.fix}" if exp.fix else ""
            raise ManifestError(f"{field} in {source} is {have!r} but {exp.name} is {exp.value!r}{fix}")
