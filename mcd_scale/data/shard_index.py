"""The per-shard sample index: written once with the shard, read lazily by the reader.

A shard ``X.tar`` gets a sidecar ``X.idx.npy``: an int64 array of shape ``[n + 1, 2]``, row ``i``
= (global sample id, byte offset of the sample's first tar header) for the ``n`` samples in file
order, and a last row (-1, end offset of the last sample's data). A sample is the byte range
``[start_i, start_{i+1})``: the reader gets it with one ``pread`` and never scans tar headers at
start-up. The sidecar's sha256 sits in the manifest's shard record (``index_sha256``), so the
manifest covers it; the reader checks it when it first loads the shard's index.

Directories written before the sidecar existed (no ``index`` in the shard record, or no manifest)
are indexed by scanning that shard's tar headers instead (:func:`scan_shard`): the same arrays,
built per shard when first needed, so a legacy directory still never holds a global index.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from typing import Optional

import numpy as np

INDEX_SUFFIX = ".idx.npy"


def index_name(shard_name: str) -> str:
    """``shard-000000.tar`` -> ``shard-000000.idx.npy``."""
    base = shard_name[:-4] if shard_name.endswith(".tar") else shard_name
    return base + INDEX_SUFFIX


def write_index(path: str, gids: list[int], starts: list[int], end: int) -> tuple[str, str]:
    """Write the sidecar for shard ``path``; returns (sidecar name, its sha256)."""
    table = np.empty((len(gids) + 1, 2), dtype=np.int64)
    table[:-1, 0] = gids
    table[:-1, 1] = starts
    table[-1] = (-1, end)
    name = index_name(os.path.basename(path))
    out = os.path.join(os.path.dirname(path), name)
    tmp = out + ".tmp"
    with open(tmp, "wb") as fh:
        np.save(fh, table, allow_pickle=False)
    with open(tmp, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    os.replace(tmp, out)
    return name, digest


def load_index(path: str, want_sha256: str, want_count: int) -> tuple[np.ndarray, np.ndarray]:
    """(gids [n], starts [n + 1]) from a sidecar, after checking its digest and sample count.
    Raises ValueError with the reason (the caller names the shard)."""
    with open(path, "rb") as fh:
        data = fh.read()
    if hashlib.sha256(data).hexdigest() != want_sha256:
        raise ValueError(f"index '{path}' does not match the manifest's index_sha256 (replaced or damaged)")
    table = np.load(io.BytesIO(data), allow_pickle=False)
    if table.dtype != np.int64 or table.ndim != 2 or table.shape[1] != 2 or table.shape[0] != want_count + 1:
        raise ValueError(f"index '{path}' has shape {table.shape} {table.dtype}, want ({want_count + 1}, 2) int64")
    return np.ascontiguousarray(table[:-1, 0]), np.ascontiguousarray(table[:, 1])


def scan_shard(path: str) -> tuple[np.ndarray, np.ndarray, Optional[str]]:
    """Index one shard by reading its tar headers (legacy directories): (gids, starts [n + 1], error).

    Samples read intact are indexed; on damage the last sample seen is dropped (it may have lost
    fields) and the error says why. Truncation shows up as a tarfile error, a member running past
    the end, or a missing end-of-archive marker (tarfile stops quietly at a cut between members).
    """
    gids: list[int] = []
    starts: list[int] = []
    size = os.path.getsize(path)
    last_key: Optional[str] = None
    end = 0
    err: Optional[str] = None
    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            while True:
                info = tar.next()
                if info is None:
                    break
                if not info.isfile():
                    continue
                parts = os.path.basename(info.name).split(".")
                if len(parts) != 3 or not parts[0].isdigit():
                    err = f"member '{info.name}' is not named <key>.<field>.<ext> with a numeric key"
                    break
                if info.offset_data + info.size > size:
                    last_key = parts[0] if parts[0] != last_key else last_key
                    if not gids or gids[-1] != int(parts[0]):
                        gids.append(int(parts[0]))
                        starts.append(info.offset)
                    err = f"member '{info.name}' runs past the end of the file (truncated)"
                    break
                if parts[0] != last_key:
                    gids.append(int(parts[0]))
                    starts.append(info.offset)
                    last_key = parts[0]
                end = info.offset_data + ((info.size + 511) // 512) * 512
            if err is None:
                fh.seek(tar.offset)
                tail = fh.read()
                if len(tail) < 1024 or tail.strip(b"\0"):
                    err = "no end-of-archive marker" + (f" after sample key {last_key}" if last_key else "") + \
                        " (the file is truncated)"
    except (tarfile.TarError, OSError, EOFError) as exc:
        err = "unreadable tar" + (f" after sample key {last_key}" if last_key else "") + f": {exc}"
    if err is not None and gids:  # distrust the last sample: it may have lost trailing fields
        end = starts[-1]
        gids, starts = gids[:-1], starts[:-1]
    return np.asarray(gids, dtype=np.int64), np.asarray(starts + [end], dtype=np.int64), err
