"""Webdataset-layout tar shards: a deterministic writer and an indexed reader.

Layout (what ``webdataset.WebDataset(...).decode()`` reads): each sample is a run of consecutive tar
members ``<key>.<field>.<ext>`` with ``key = "%010d" % global_id``; ``ext`` is ``npy`` (a numpy array
written by ``np.save(allow_pickle=False)``) or ``json`` (a dict, UTF-8, sorted keys). Shards are
written by ``webdataset.TarWriter`` with fixed metadata (mtime 0, uid/gid 0, empty uname/gname, mode
0644, ustar format), so they are byte-deterministic: same samples in, same bytes out.

Each shard gets an index sidecar when it is written (:mod:`mcd_scale.data.shard_index`: id and
byte offset of every sample, its sha256 in the manifest). The reader opens a manifest with one
``stat`` per shard, loads a shard's index when it first reads from that shard (a bounded cache), and
serves ``dataset[global_id]`` with one ``os.pread`` of the sample's byte range. It keeps no open file
handle or cached index across a fork or a pickle, so DataLoader workers start small and open their
own handles lazily.

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
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import webdataset

from mcd_scale.data.shard_index import load_index, scan_shard, write_index
from mcd_scale.errors import InputError

KEY_FORMAT = "%010d"
"""Sample keys are the zero-padded decimal global sample id (so lexical order == numeric order)."""

Field = Union[np.ndarray, dict]
Sample = dict[str, Field]


class ShardError(InputError, RuntimeError):
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


def _tar_writer(fileobj) -> "webdataset.TarWriter":
    # webdataset's own writer, with fixed metadata: the bytes of a shard must depend only on its
    # samples (re-runs are diffable and the manifest's sha256 is meaningful). encoder=False: fields
    # arrive as bytes from encode_field (npy without pickle, canonical JSON).
    writer = webdataset.TarWriter(fileobj, encoder=False, user="", group="", mode=0o644, mtime=0)
    # TarWriter opens its stream in tarfile's default (pax) format; ustar writes the same headers for
    # our short ASCII names and refuses, rather than extends, anything else.
    writer.tarstream.format = tarfile.USTAR_FORMAT
    return writer


def _finish_shard(tmp_path: str, path: str, num_samples: int, first_id: int, last_id: int,
                  gids: list[int], starts: list[int], end: int) -> dict:
    # The index goes first: a shard under its final name always has its sidecar next to it.
    index, index_sha = write_index(path, gids, starts, end)
    h = hashlib.sha256()
    with open(tmp_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    os.replace(tmp_path, path)  # atomic: a reader never sees a half-written shard under its name
    return {"name": os.path.basename(path), "num_samples": num_samples, "bytes": os.path.getsize(path),
            "sha256": h.hexdigest(), "first_id": first_id, "last_id": last_id,
            "index": index, "index_sha256": index_sha}


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
    writer: Optional[webdataset.TarWriter] = None
    fh = None
    tmp_path = path = ""
    count = first_id = 0
    prev_id = -1
    gids: list[int] = []
    starts: list[int] = []  # byte offset of each sample's first header: the shard's index
    try:
        for global_id, fields in samples:
            global_id = int(global_id)
            if global_id <= prev_id:
                raise ValueError(f"write_shards: sample ids must be strictly increasing; got {global_id} after {prev_id}")
            prev_id = global_id
            if writer is None:
                path = os.path.join(out_dir, f"{prefix}-{first_shard + len(records):06d}.tar")
                tmp_path = path + ".tmp"
                fh = open(tmp_path, "wb")
                writer = _tar_writer(fh)
                count, first_id = 0, global_id
                gids, starts = [], []
            sample: dict[str, Any] = {"__key__": KEY_FORMAT % global_id}
            for name in sorted(fields):
                if "." in name or "/" in name:
                    raise ValueError(f"field name '{name}' may not contain '.' or '/' (webdataset splits keys on '.')")
                suffix, payload = encode_field(name, fields[name])
                sample[suffix] = payload
            gids.append(global_id)
            starts.append(writer.tarstream.offset)
            writer.write(sample)
            count += 1
            if count == samples_per_shard:
                end = writer.tarstream.offset
                writer.close()
                fh.close()
                writer = None
                records.append(_finish_shard(tmp_path, path, count, first_id, global_id, gids, starts, end))
    except BaseException:
        if writer is not None:  # our own half-written .tmp: never left behind under any name
            try:
                writer.close()  # flushes tarfile's stream buffer now, not at garbage collection
            finally:
                fh.close()
            os.remove(tmp_path)
        raise
    if writer is not None:
        end = writer.tarstream.offset
        writer.close()
        fh.close()
        records.append(_finish_shard(tmp_path, path, count, first_id, prev_id, gids, starts, end))
    return records




# ----------------------------------------------------------------------------------------------
# Reading


def _decode_member(field: str, ext: str, payload: bytes) -> Field:
    if ext == "npy":
        return np.load(io.BytesIO(payload), allow_pickle=False)
    if ext == "json":
        value = json.loads(payload.decode("utf-8"))
        if not isinstance(value, dict):
            raise ValueError(f"JSON payload is a {type(value).__name__}, expected an object")
        return value
    raise ValueError(f"unknown extension '.{ext}' (expected .npy or .json)")


def _parse_sample(blob: bytes, key: str) -> Iterator[tuple[str, str, bytes]]:
    """(field, ext, payload) of each tar member in one sample's byte range."""
    pos = 0
    while pos < len(blob):
        header = blob[pos:pos + 512]
        if len(header) < 512:
            raise ValueError(f"short tar header at byte {pos} of the sample")
        info = tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
        parts = os.path.basename(info.name).split(".")
        if len(parts) != 3 or parts[0] != key:
            raise ValueError(f"member '{info.name}' does not belong to sample key {key}")
        payload = blob[pos + 512:pos + 512 + info.size]
        if len(payload) != info.size:
            raise ValueError(f"member '{info.name}': short read ({len(payload)} of {info.size} bytes)")
        yield parts[1], parts[2], payload
        pos += 512 + ((info.size + 511) // 512) * 512


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


_CACHED_INDEXES = 160
"""Shard indexes kept per process: more than the shards one sampler stripe touches (64 blocks), so
a micro-batch never reloads an index; ~25 MB at 10k samples per shard."""

Validator = Any  # Callable[[int, Sample], Optional[str]]: an error message for a bad sample, else None


class ShardedDataset:
    """Samples by global id over webdataset-layout tar shards, through per-shard indexes.

    ``source`` is a split directory (all ``*.tar`` in name order, or the manifest's shard list when
    ``manifest`` is given) or an explicit list of shard paths. ``manifest`` is the split's manifest
    record (``{"num_samples": N, "shards": [{"name", "num_samples", "bytes", "first_id", "last_id",
    "index", "index_sha256"}]}``).

    Start-up with a manifest costs one ``stat`` per shard and nothing per sample: a shard's index
    (its sidecar, see :mod:`mcd_scale.data.shard_index`) is loaded when a sample of that shard is
    first read, and at most ``_CACHED_INDEXES`` are kept, so memory does not grow with the corpus
    and a DataLoader worker inherits no big index. A shard whose size differs from the manifest's
    ``bytes`` is truncated or replaced: named at open. Shard records without ``index`` (written
    before the sidecar) are indexed by a header scan of that shard when first needed. Without a
    manifest every shard is scanned at open (small, hand-made directories only: sample ids must
    then cover ``0 .. len-1``).

    Errors (missing/truncated/corrupt shard, missing key, undecodable member, a sample the
    ``validate`` callable rejects) raise :class:`ShardError` naming the shard and the key. With
    ``skip_corrupt=True`` those samples read as ``None`` and are counted in ``.skipped`` (per
    process: DataLoader workers count their own; the loader sums them from the batches).
    """

    def __init__(self, source: Union[str, Sequence[str]], manifest: Optional[Mapping] = None,
                 skip_corrupt: bool = False, validate: Optional[Validator] = None) -> None:
        self.skip_corrupt = skip_corrupt
        self.validate = validate
        self.skipped = 0
        self._fds: dict[int, int] = {}  # shard number -> descriptor, valid in process _pid only
        self._pid = os.getpid()
        self.paths = _shard_list(source, manifest)
        self.damaged: list[str] = []  # damaged shards tolerated under skip_corrupt (for the log)
        self._records: list[Mapping] = list(manifest["shards"]) if manifest else []
        self._indexes: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # shard no -> (gids, starts)
        self._pinned = manifest is None  # scanned indexes cannot be re-read cheaply: keep them
        self._readable_end: dict[int, int] = {}  # damaged shard -> bytes still usable
        if manifest is not None:
            self._open_with_manifest(manifest)
        else:
            self._open_by_scan()

    # -- opening -------------------------------------------------------------------------------
    def _open_with_manifest(self, manifest: Mapping) -> None:
        self._len = int(manifest["num_samples"])
        self._first = np.array([int(r["first_id"]) for r in self._records], dtype=np.int64)
        self._last = np.array([int(r["last_id"]) for r in self._records], dtype=np.int64)
        for shard_no, (path, rec) in enumerate(zip(self.paths, self._records)):
            if not os.path.isfile(path):
                raise ShardError(f"shard '{path}' is missing")
            size = os.path.getsize(path)
            if "bytes" in rec and size != int(rec["bytes"]):
                self._damaged(shard_no, size, f"is {size} bytes but the manifest says {rec['bytes']} "
                                              "(truncated or replaced)")

    def _damaged(self, shard_no: int, size: int, why: str) -> None:
        path = self.paths[shard_no]
        try:
            gids, starts = self._index(shard_no)
        except ShardError:
            gids, starts = np.zeros(0, np.int64), np.zeros(1, np.int64)
        lost = np.nonzero(starts[1:] > size)[0]
        where = f"; samples from key {KEY_FORMAT % int(gids[lost[0]])} on are lost" if len(lost) else ""
        msg = f"shard '{path}' {why}{where}"
        if not self.skip_corrupt:
            raise ShardError(msg + ". Re-create it, or set data.skip_corrupt=true to skip (and count) "
                             "the unreadable samples.")
        self.damaged.append(msg)
        self._readable_end[shard_no] = size

    def _open_by_scan(self) -> None:
        firsts, lasts, total = [], [], 0
        for shard_no, path in enumerate(self.paths):
            if not os.path.isfile(path):
                raise ShardError(f"shard '{path}' is missing")
            gids, starts, err = scan_shard(path)
            if err is not None:
                if not self.skip_corrupt:
                    raise ShardError(f"shard '{path}': {err}. Re-create it, or set data.skip_corrupt=true "
                                     "to skip (and count) the unreadable samples.")
                self.damaged.append(f"{path}: {err}")
            self._indexes[shard_no] = (gids, starts)
            firsts.append(int(gids[0]) if len(gids) else -1)
            lasts.append(int(gids[-1]) if len(gids) else -2)
            total += len(gids)
        self._first = np.array(firsts, dtype=np.int64)
        self._last = np.array(lasts, dtype=np.int64)
        self._len = max(lasts) + 1 if lasts and max(lasts) >= 0 else 0
        if total < self._len and not self.skip_corrupt:
            have = np.zeros(self._len, dtype=bool)
            for gids, _ in self._indexes.values():
                have[gids] = True
            g = int(np.nonzero(~have)[0][0])
            raise ShardError(f"sample key {KEY_FORMAT % g} ({self._len - total} missing in all) not found; "
                             f"expected in '{self._shard_for(g)}'. Re-create the shards, or set "
                             "data.skip_corrupt=true.")

    # -- index ---------------------------------------------------------------------------------
    def _index(self, shard_no: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._indexes.get(shard_no)
        if index is not None:
            return index
        path, rec = self.paths[shard_no], self._records[shard_no]
        if "index" in rec:
            try:
                index = load_index(os.path.join(os.path.dirname(path), rec["index"]), rec["index_sha256"],
                                   int(rec["num_samples"]))
            except ShardError:  # already names its shard (a ValueError too, as every input error)
                raise
            except (OSError, ValueError) as exc:
                raise ShardError(f"shard '{path}': {exc}. Re-create the shard set.") from None
        else:  # written before the sidecar existed: scan this shard's headers once
            gids, starts, err = scan_shard(path)
            if err is None and len(gids) != int(rec["num_samples"]):
                err = f"holds {len(gids)} samples but the manifest says {rec['num_samples']} (truncated or replaced)"
            if err is not None:
                if not self.skip_corrupt:
                    raise ShardError(f"shard '{path}': {err}. Re-create it, or set data.skip_corrupt=true "
                                     "to skip (and count) the unreadable samples.")
                self.damaged.append(f"{path}: {err}")
            index = (gids, starts)
        if not self._pinned and len(self._indexes) >= _CACHED_INDEXES:
            self._indexes.pop(next(iter(self._indexes)))
        self._indexes[shard_no] = index
        return index

    def _shard_of(self, gid: int) -> int:
        """Shard number whose [first_id, last_id] covers ``gid``, or -1."""
        k = int(np.searchsorted(self._first, gid, side="right")) - 1
        return k if k >= 0 and gid <= self._last[k] else -1

    def _shard_for(self, gid: int) -> str:
        """The shard that should hold ``gid`` (for error messages)."""
        k = self._shard_of(gid)
        if k < 0:
            k = min(int(np.searchsorted(self._first, gid, side="right")), len(self.paths) - 1)
        return self.paths[k] if self.paths else "<no shards>"

    # -- pickling / fork safety: file descriptors and cached indexes are per process -----------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = {}
        if not self._pinned:
            state["_indexes"] = {}
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

    def _fail(self, msg: str) -> None:
        if self.skip_corrupt:
            self.skipped += 1
            return None
        raise ShardError(msg + ". Re-create the shard, or set data.skip_corrupt=true.")

    def __getitem__(self, global_id: int) -> Optional[Sample]:
        gid = int(global_id)
        if not 0 <= gid < self._len:
            raise IndexError(f"sample id {gid} out of range [0, {self._len})")
        key = KEY_FORMAT % gid
        shard_no = self._shard_of(gid)
        if shard_no < 0:
            return self._fail(f"sample key {key} not found; expected in '{self._shard_for(gid)}'")
        path = self.paths[shard_no]
        gids, starts = self._index(shard_no)
        i = int(np.searchsorted(gids, gid))
        if i >= len(gids) or gids[i] != gid:
            return self._fail(f"shard '{path}': sample key {key} is missing from its shard")
        start, end = int(starts[i]), int(starts[i + 1])
        if end > self._readable_end.get(shard_no, end):
            return self._fail(f"shard '{path}': sample key {key} lies past the end of the truncated shard")
        out: Sample = {}
        member = key
        try:
            blob = os.pread(self._fd(shard_no), end - start, start)
            for field, ext, payload in _parse_sample(blob, key):
                member = f"{key}.{field}.{ext}"
                out[field] = _decode_member(field, ext, payload)
        except Exception as exc:  # noqa: BLE001 - any read/decode failure becomes a named error
            return self._fail(f"shard '{path}': sample key {key}, member '{member}' is undecodable: {exc}")
        if self.validate is not None:
            bad = self.validate(out)
            if bad:
                return self._fail(f"shard '{path}': sample key {key}: {bad}")
        return out

    def __getitems__(self, global_ids: Sequence[int]) -> list[Optional[Sample]]:
        """A batch of samples, read in file order (forward within each shard), returned in the
        order asked."""
        order = sorted(range(len(global_ids)), key=lambda j: int(global_ids[j]))
        out: list[Optional[Sample]] = [None] * len(global_ids)
        for j in order:
            out[j] = self[global_ids[j]]
        return out

    def __iter__(self) -> Iterator[Optional[Sample]]:
        for gid in range(self._len):
            yield self[gid]
