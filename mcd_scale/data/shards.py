"""Webdataset-layout tar shards: a deterministic writer and a random-access reader.

Layout (what ``webdataset.WebDataset(...).decode()`` reads): each sample is a run of consecutive tar
members ``<key>.<field>.<ext>`` with ``key = "%010d" % global_id``; ``ext`` is ``npy`` (a numpy array
written by ``np.save(allow_pickle=False)``) or ``json`` (a dict, UTF-8, sorted keys). The writer is
byte-deterministic: fixed tar header metadata (mtime 0, uid/gid 0, empty uname/gname, mode 0644,
ustar format), members in the order given, fields sorted by name.

The reader indexes tar headers on open (it seeks past payloads, never reads them) and then serves
``dataset[global_id]`` with one ``os.pread`` per field. It keeps no open file handle across a fork or
a pickle, so DataLoader worker processes each open their own handles lazily.

This module is generic on purpose: the token shards of ``tools/prepare_data.py`` carry one field
(``ids``); the trajectory shards of the distillation stage reuse it with more fields.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

KEY_FORMAT = "%010d"
"""Sample keys are the zero-padded decimal global sample id (so lexical order == numeric order)."""

Field = Union[np.ndarray, dict]
Sample = dict[str, Field]


class ShardError(RuntimeError):
    """A shard is missing, truncated or holds an undecodable member. The message names the shard
    path and, where known, the sample key."""


# ----------------------------------------------------------------------------------------------
# Writing


def encode_field(name: str, value: Any) -> tuple[str, bytes]:
    """(member suffix, payload bytes) for one field; ndarray -> ``.npy``, dict -> ``.json``."""
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"field '{name}': object arrays would need pickle; use a numeric dtype")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
        return f"{name}.npy", buf.getvalue()
    if isinstance(value, dict):
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return f"{name}.json", text.encode("utf-8")
    raise TypeError(f"field '{name}' has type {type(value).__name__}; shards store np.ndarray or dict")


def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    # Fixed metadata: the bytes of a shard must depend only on its samples (re-runs are diffable
    # and the manifest's sha256 is meaningful).
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _finish_shard(tmp_path: str, path: str, num_samples: int, first_id: int, last_id: int) -> dict:
    h = hashlib.sha256()
    with open(tmp_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    os.replace(tmp_path, path)  # atomic: a reader never sees a half-written shard under its name
    return {"name": os.path.basename(path), "num_samples": num_samples, "bytes": os.path.getsize(path),
            "sha256": h.hexdigest(), "first_id": first_id, "last_id": last_id}


def write_shards(out_dir: str, samples: Iterable[tuple[int, Mapping[str, Field]]], samples_per_shard: int,
                 prefix: str = "shard", *, first_shard: int = 0) -> list[dict]:
    """Write ``samples`` as ``out_dir/{prefix}-{i:06d}.tar`` shards of ``samples_per_shard`` samples.

    ``samples`` yields ``(global_id, {field: ndarray | dict})`` with strictly increasing ids (the
    reader maps id -> member offsets; increasing ids keep shard ranges disjoint and sorted). Returns
    one record per shard: ``{name, num_samples, bytes, sha256, first_id, last_id}`` for the manifest.
    Same samples in -> same bytes out.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    os.makedirs(out_dir, exist_ok=True)
    records: list[dict] = []
    tar: Optional[tarfile.TarFile] = None
    tmp_path = path = ""
    count = first_id = 0
    prev_id = -1
    for global_id, fields in samples:
        global_id = int(global_id)
        if global_id <= prev_id:
            raise ValueError(f"write_shards: sample ids must be strictly increasing; got {global_id} after {prev_id}")
        prev_id = global_id
        if tar is None:
            path = os.path.join(out_dir, f"{prefix}-{first_shard + len(records):06d}.tar")
            tmp_path = path + ".tmp"
            tar = tarfile.open(tmp_path, "w", format=tarfile.USTAR_FORMAT)
            count, first_id = 0, global_id
        key = KEY_FORMAT % global_id
        for name in sorted(fields):
            if "." in name or "/" in name:
                raise ValueError(f"field name '{name}' may not contain '.' or '/' (webdataset splits keys on '.')")
            suffix, payload = encode_field(name, fields[name])
            _tar_member(tar, f"{key}.{suffix}", payload)
        count += 1
        if count == samples_per_shard:
            tar.close()
            tar = None
            records.append(_finish_shard(tmp_path, path, count, first_id, global_id))
    if tar is not None:
        tar.close()
        records.append(_finish_shard(tmp_path, path, count, first_id, prev_id))
    return records


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class _Member:
    field: str
    ext: str
    offset: int
    size: int


def _decode_member(member: _Member, payload: bytes) -> Field:
    if member.ext == "npy":
        return np.load(io.BytesIO(payload), allow_pickle=False)
    if member.ext == "json":
        value = json.loads(payload.decode("utf-8"))
        if not isinstance(value, dict):
            raise ValueError(f"JSON payload is a {type(value).__name__}, expected an object")
        return value
    raise ValueError(f"unknown extension '.{member.ext}' (expected .npy or .json)")


def _index_shard(path: str) -> tuple[dict[int, tuple[_Member, ...]], Optional[str]]:
    """Map global id -> members for one shard, reading tar headers only.

    Returns (index of the samples read intact, error message or None). Truncation shows up either as
    a tarfile error or as a missing end-of-archive marker (tarfile stops quietly at a header cut at
    a block boundary, so we check the zero blocks that every complete tar ends with).
    """
    index: dict[int, list[_Member]] = {}
    size = os.path.getsize(path)
    last_key = None
    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            while True:
                info = tar.next()
                if info is None:
                    break
                if not info.isfile():
                    continue
                base = os.path.basename(info.name)
                parts = base.split(".")
                if len(parts) != 3 or not parts[0].isdigit():
                    return _freeze(index), f"member '{info.name}' is not named <key>.<field>.<ext> with a numeric key"
                last_key = parts[0]
                if info.offset_data + info.size > size:
                    return _freeze(index, drop=int(parts[0])), f"member '{info.name}' runs past the end of the file (truncated)"
                index.setdefault(int(parts[0]), []).append(_Member(parts[1], parts[2], info.offset_data, info.size))
            end = tar.offset
            fh.seek(end)
            tail = fh.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        where = f" after sample key {last_key}" if last_key else ""
        drop = int(last_key) if last_key else None
        return _freeze(index, drop=drop), f"unreadable tar{where}: {exc}"
    if len(tail) < 1024 or tail.strip(b"\0"):
        # The last sample may have lost trailing fields: distrust it.
        drop = int(last_key) if last_key else None
        where = f" after sample key {last_key}" if last_key else ""
        return _freeze(index, drop=drop), f"no end-of-archive marker{where} (the file is truncated)"
    return _freeze(index), None


def _freeze(index: dict[int, list[_Member]], drop: Optional[int] = None) -> dict[int, tuple[_Member, ...]]:
    return {k: tuple(v) for k, v in index.items() if k != drop}


def _shard_list(source: Union[str, Sequence[str]], manifest: Optional[Mapping]) -> list[str]:
    if isinstance(source, str):
        if not os.path.isdir(source):
            raise ShardError(f"shard directory '{source}' does not exist (run tools/prepare_data.py, or fix data.path)")
        if manifest is not None:
            return [os.path.join(source, s["name"]) for s in manifest["shards"]]
        paths = sorted(glob.glob(os.path.join(source, "*.tar")))
        if not paths:
            raise ShardError(f"no *.tar shards in '{source}'")
        return paths
    return list(source)


class ShardedDataset:
    """Random access by global sample id over webdataset-layout tar shards.

    ``source`` is a split directory (all ``*.tar`` in name order, or the manifest's shard list when
    ``manifest`` is given) or an explicit list of shard paths. ``manifest`` is the split's manifest
    record (``{"num_samples": N, "shards": [{"name", "num_samples", ...}]}``); with it, counts are
    checked and a truncated shard is caught even when the cut falls on a member boundary.

    Sample ids must cover ``0 .. len-1``. Errors (missing/truncated/corrupt shard, missing key,
    undecodable member) raise :class:`ShardError` naming the shard and the key. With
    ``skip_corrupt=True`` those samples read as ``None`` instead and are counted in ``.skipped``
    (per process: DataLoader workers count their own; :class:`~mcd_scale.data.loader.MicroBatchLoader`
    sums them from the batches).
    """

    def __init__(self, source: Union[str, Sequence[str]], manifest: Optional[Mapping] = None,
                 skip_corrupt: bool = False) -> None:
        self.skip_corrupt = skip_corrupt
        self.skipped = 0
        self._fds: dict[int, int] = {}  # shard number -> descriptor, valid in process _pid only
        self._pid = os.getpid()
        self.paths = _shard_list(source, manifest)
        self._index: dict[int, tuple[int, tuple[_Member, ...]]] = {}
        self._bad: dict[int, str] = {}  # global id -> why it cannot be read (skip_corrupt only)
        expected = {s["name"]: int(s["num_samples"]) for s in manifest["shards"]} if manifest else {}
        ranges: list[tuple[int, int, int]] = []  # (shard no, first id, last id) as indexed
        self.damaged: list[str] = []  # damaged shards tolerated under skip_corrupt (for the log)
        for shard_no, path in enumerate(self.paths):
            if not os.path.isfile(path):
                raise ShardError(f"shard '{path}' is missing")
            index, err = _index_shard(path)
            want = expected.get(os.path.basename(path))
            if err is None and want is not None and want != len(index):
                err = f"holds {len(index)} samples but the manifest says {want} (truncated or replaced)"
            if err is not None:
                if not skip_corrupt:
                    raise ShardError(f"shard '{path}': {err}. Re-create it, or set data.skip_corrupt=true "
                                     "to skip (and count) the unreadable samples.")
                self.damaged.append(f"{path}: {err}")
                self._note_bad_shard(path, shard_no, index, want, manifest, err)
            for gid, members in index.items():
                if gid in self._index:
                    other = self.paths[self._index[gid][0]]
                    raise ShardError(f"sample key {KEY_FORMAT % gid} is in both '{other}' and '{path}'")
                self._index[gid] = (shard_no, members)
            if index:
                ranges.append((shard_no, min(index), max(index)))
        self._len = int(manifest["num_samples"]) if manifest else (max(self._index) + 1 if self._index else 0)
        if manifest:  # the manifest knows where each id belongs even if a shard lost samples
            ranges, first = [], 0
            for shard_no, rec in enumerate(manifest["shards"]):
                ranges.append((shard_no, first, first + int(rec["num_samples"]) - 1))
                first += int(rec["num_samples"])
        self._ranges = ranges
        missing = [g for g in range(self._len) if g not in self._index and g not in self._bad]
        if missing:
            reason = "missing from its shard"
            if not skip_corrupt:
                g = missing[0]
                raise ShardError(f"sample key {KEY_FORMAT % g} ({len(missing)} missing in all) not found; expected in "
                                 f"'{self._shard_for(g)}'. Re-create the shards, or set data.skip_corrupt=true.")
            for g in missing:
                self._bad[g] = f"shard '{self._shard_for(g)}': sample key {KEY_FORMAT % g} {reason}"

    def _note_bad_shard(self, path: str, shard_no: int, index: Mapping[int, Any], want: Optional[int],
                        manifest: Optional[Mapping], err: str) -> None:
        """skip_corrupt: remember which ids the broken shard should have held."""
        if manifest is None or want is None:
            return  # ids are unknown without a manifest; gaps are caught by the contiguity check
        first = sum(int(s["num_samples"]) for s in manifest["shards"][:shard_no])
        for gid in range(first, first + want):
            if gid not in index:
                self._bad[gid] = f"shard '{path}': sample key {KEY_FORMAT % gid} unreadable ({err})"

    def _shard_for(self, gid: int) -> str:
        """The shard that should hold ``gid`` (for error messages): the one whose range covers it,
        else the first shard starting after it."""
        for shard_no, _lo, hi in self._ranges:
            if gid <= hi:
                return self.paths[shard_no]
        return self.paths[-1] if self.paths else "<no shards>"

    # -- pickling / fork safety: file descriptors are per process ------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def _fd(self, shard_no: int) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptors are not ours to use
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard_no)
        if fd is None:
            fd = os.open(self.paths[shard_no], os.O_RDONLY)
            self._fds[shard_no] = fd
        return fd

    def close(self) -> None:
        """Close this process's file handles (they reopen lazily on the next read)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful to do
            pass

    # -- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    def __getitem__(self, global_id: int) -> Optional[Sample]:
        gid = int(global_id)
        if not 0 <= gid < self._len:
            raise IndexError(f"sample id {gid} out of range [0, {self._len})")
        if gid in self._bad:
            self.skipped += 1
            return None
        shard_no, members = self._index[gid]
        fd = self._fd(shard_no)
        out: Sample = {}
        for m in members:
            try:
                payload = os.pread(fd, m.size, m.offset)
                if len(payload) != m.size:
                    raise ValueError(f"short read ({len(payload)} of {m.size} bytes)")
                out[m.field] = _decode_member(m, payload)
            except Exception as exc:  # noqa: BLE001 - any decode failure becomes a named error
                msg = (f"shard '{self.paths[shard_no]}': sample key {KEY_FORMAT % gid}, member "
                       f"'{KEY_FORMAT % gid}.{m.field}.{m.ext}' is undecodable: {exc}")
                if self.skip_corrupt:
                    self.skipped += 1
                    return None
                raise ShardError(msg + ". Re-create the shard, or set data.skip_corrupt=true.") from None
        return out

    def __iter__(self) -> Iterator[Optional[Sample]]:
        for gid in range(self._len):
            yield self[gid]
