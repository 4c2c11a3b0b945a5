"""Corpus inputs -> a stream of raw documents, in corpus order, in bounded memory.

Inputs (docs/data.md): ``.txt``, ``.jsonl`` and ``.parquet`` files, each plain, ``.gz`` or ``.zst``; a
local Hugging Face ``datasets`` directory (``save_to_disk``); a dataset name where the machine is online;
directories of these (recursive, name order). One document per JSON line / parquet row / dataset row; for
plain text, one per file (``doc_boundary="file"``) or per blank-line-separated paragraph (``"blank-line"``).

The reader does the cheap part only (decompression, line and paragraph splitting) and hands each document
on as a :class:`RawDoc` whose payload the tokenizing workers decode (UTF-8, JSON): so the parsing runs in
parallel too, and a bad document's error is raised in corpus order, naming its file and line or row.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tempfile
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

TEXT_EXT = (".txt",)
JSONL_EXT = (".jsonl", ".json")
PARQUET_EXT = (".parquet",)
COMPRESSION_EXT = ("", ".gz", ".zst")
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class IngestError(ValueError):
    """Bad input (a file, a row, a flag): the message names the file (and line or row) and the fix."""


@dataclass(frozen=True)
class RawDoc:
    """One document before decoding. ``fmt``: ``"text"`` (UTF-8 bytes), ``"jsonl"`` (one JSON line's bytes)
    or ``"str"`` (already a Python value, from parquet or a dataset: checked to be a string by the worker)."""
    fmt: str
    payload: object
    where: str  # "file:line" or "file row N": what an error message names


@dataclass
class SourceInfo:
    path: str
    kind: str  # txt | jsonl | parquet | datasets | hub
    bytes: int = 0
    sha256: str = ""


def _kind_of(name: str) -> Optional[str]:
    for comp in COMPRESSION_EXT:
        for kind, exts in (("txt", TEXT_EXT), ("jsonl", JSONL_EXT), ("parquet", PARQUET_EXT)):
            if any(name.endswith(e + comp) for e in exts):
                return kind
    return None


def _is_dataset_dir(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in DATASET_MARKERS)


def _hub_like(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name)) and not os.path.exists(name.split("/")[0])


def find_sources(inputs: Sequence[str], exclude: str = "") -> list[SourceInfo]:
    """Expand ``inputs`` into sources: directories recursively (name order, files of a known kind; a
    ``datasets`` directory is one source), files as given. ``exclude`` (the output directory) is skipped."""
    skip = os.path.abspath(exclude) + os.sep if exclude else None
    out: list[SourceInfo] = []
    for item in inputs:
        if _is_dataset_dir(item):
            out.append(SourceInfo(item, "datasets"))
        elif os.path.isdir(item):
            found: list[SourceInfo] = []
            for root, dirs, names in os.walk(item):
                dirs.sort()
                if skip and (os.path.abspath(root) + os.sep).startswith(skip):
                    dirs[:] = []
                    continue
                if _is_dataset_dir(root) and os.path.abspath(root) != os.path.abspath(item):
                    found.append(SourceInfo(root, "datasets"))
                    dirs[:] = []
                    continue
                for name in sorted(names):
                    kind = _kind_of(name)
                    if kind:
                        found.append(SourceInfo(os.path.join(root, name), kind))
            if not found:
                raise IngestError(f"input directory '{item}' holds no .txt, .jsonl or .parquet files (plain, .gz "
                                  "or .zst) and is not a datasets directory")
            found.sort(key=lambda s: s.path)
            out.extend(found)
        elif os.path.isfile(item):
            kind = _kind_of(item)
            if kind is None:
                raise IngestError(f"input '{item}': unknown kind; name it .txt, .jsonl or .parquet (optionally "
                                  ".gz or .zst), or pass a datasets directory")
            out.append(SourceInfo(item, kind))
        elif _hub_like(item):
            out.append(SourceInfo(item, "hub"))
        else:
            raise IngestError(f"input '{item}' does not exist (pass files, directories or a datasets directory)")
    return out


def _read_error(exc: BaseException) -> bool:
    """An error of reading or decompressing a file (as opposed to a bug)."""
    return isinstance(exc, (OSError, EOFError, ValueError, zlib.error)) or "zstd" in type(exc).__name__.lower()


class _HashingReader(io.RawIOBase):
    """Reads a file, feeding every byte read into sha256 (the manifest's source digest, in the same pass)."""

    def __init__(self, path: str):
        self.fh = open(path, "rb")
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.fh.readinto(b)
        if n:
            self.sha.update(memoryview(b)[:n])
            self.nbytes += n
        return n or 0

    def drain(self) -> None:
        while self.readinto(bytearray(1 << 20)):
            pass

    def close(self) -> None:
        self.fh.close()
        super().close()


def _open_stream(path: str, raw: _HashingReader):
    buffered = io.BufferedReader(raw, buffer_size=1 << 20)
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=buffered, mode="rb")
    if path.endswith(".zst"):
        # lazy: loads zstandard; importing this module does not need it
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(buffered, read_size=1 << 20),
                                 buffer_size=1 << 20)
    return buffered


def _blank(line: bytes) -> bool:
    return not line.strip(b" \t\r\n")


def _text_docs(src: SourceInfo, stream, doc_boundary: str) -> Iterator[RawDoc]:
    if doc_boundary == "file":
        data = stream.read()
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        data = data.replace(b"\r\n", b"\n")
        if data.strip():
            yield RawDoc("text", data, f"{src.path}:1")
        return
    # Paragraphs: runs of non-blank lines (a blank line holds only spaces/tabs), joined by "\n".
    para: list[bytes] = []
    start = 0
    for lineno, line in enumerate(stream, 1):
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if _blank(line):
            if para:
                yield RawDoc("text", b"\n".join(para), f"{src.path}:{start}")
                para = []
            continue
        if not para:
            start = lineno
        para.append(line.rstrip(b"\n").removesuffix(b"\r"))
    if para:
        yield RawDoc("text", b"\n".join(para), f"{src.path}:{start}")


def _jsonl_docs(src: SourceInfo, stream) -> Iterator[RawDoc]:
    for lineno, line in enumerate(stream, 1):
        yield RawDoc("jsonl", line, f"{src.path}:{lineno}")


def _column_docs(src: SourceInfo, batches, text_field: str, label: str) -> Iterator[RawDoc]:
    row = 0
    for batch in batches:
        for value in batch:
            yield RawDoc("str", value, f"{src.path} {label} {row}")
            row += 1


def _parquet_docs(src: SourceInfo, text_field: str) -> Iterator[RawDoc]:
    # lazy: loads pyarrow; importing this module does not need it
    import pyarrow.parquet as pq

    tmp = None
    path = src.path
    try:
        if src.path.endswith((".gz", ".zst")):  # parquet needs a seekable file: decompress to a temporary one
            raw = _HashingReader(src.path)
            try:
                with _open_stream(src.path, raw) as stream, \
                        tempfile.NamedTemporaryFile(suffix=".parquet", delete=False) as t:
                    tmp = path = t.name
                    while True:
                        block = stream.read(1 << 20)
                        if not block:
                            break
                        t.write(block)
                    raw.drain()
            except Exception as exc:  # noqa: BLE001 - see _read_error
                if not _read_error(exc):
                    raise
                raise IngestError(f"cannot read input '{src.path}': {' '.join(str(exc).split())[:200]} (a truncated "
                                  "or corrupt compressed file?)") from None
            src.sha256, src.bytes = raw.sha.hexdigest(), raw.nbytes
            raw.close()
        else:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            src.sha256, src.bytes = h.hexdigest(), os.path.getsize(path)
        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid and OSError
            raise IngestError(f"input '{src.path}' is not a readable parquet file: {' '.join(str(exc).split())[:160]}"
                              ) from None
        if text_field not in pf.schema_arrow.names:
            raise IngestError(f"input '{src.path}' has no column '{text_field}' (columns: "
                              f"{', '.join(pf.schema_arrow.names)[:200]}); pass --text-field NAME")
        batches = (b.column(0).to_pylist() for b in pf.iter_batches(batch_size=1024, columns=[text_field]))
        yield from _column_docs(src, batches, text_field, "row")
    finally:
        if tmp:
            os.remove(tmp)


def _dataset_docs(src: SourceInfo, text_field: str, split: str) -> Iterator[RawDoc]:
    try:
        # lazy: an optional dependency, its absence handled here
        import datasets
    except ImportError:
        raise IngestError(f"input '{src.path}' needs the 'datasets' package (pip install -r requirements.txt)") from None
    try:
        if src.kind == "datasets":
            ds = datasets.load_from_disk(src.path)
        else:
            ds = datasets.load_dataset(src.path, split=split, streaming=True)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, corrupt directory
        raise IngestError(f"input '{src.path}': cannot load the dataset ({' '.join(str(exc).split())[:160]}); "
                          "pass a local save_to_disk directory or files") from None
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in ds:
            raise IngestError(f"input '{src.path}' has splits {sorted(ds)}, not '{split}'; pass --dataset-split")
        ds = ds[split]
    names = ds.column_names or []
    if text_field not in names:
        raise IngestError(f"input '{src.path}' has no column '{text_field}' (columns: {', '.join(names)[:200]}); "
                          "pass --text-field NAME")
    if src.kind == "datasets":
        src.sha256 = getattr(ds, "_fingerprint", "") or ""
        batches = (b[text_field] for b in ds.select_columns([text_field]).iter(batch_size=1024))
    else:
        batches = ([row[text_field]] for row in ds)
    yield from _column_docs(src, batches, text_field, "row")


def iter_documents(sources: Sequence[SourceInfo], text_field: str = "text", doc_boundary: str = "blank-line",
                   dataset_split: str = "train") -> Iterator[RawDoc]:
    """Every document of ``sources`` in corpus order. Fills each source's ``bytes``/``sha256`` as it reads."""
    if doc_boundary not in ("file", "blank-line"):
        raise IngestError(f"--doc-boundary must be 'file' or 'blank-line', got '{doc_boundary}'")
    for src in sources:
        if src.kind in ("datasets", "hub"):
            yield from _dataset_docs(src, text_field, dataset_split)
            continue
        if src.kind == "parquet":
            yield from _parquet_docs(src, text_field)
            continue
        try:
            raw = _HashingReader(src.path)
        except OSError as exc:
            raise IngestError(f"cannot read input '{src.path}': {exc}") from None
        try:
            with _open_stream(src.path, raw) as stream:
                gen = _jsonl_docs(src, stream) if src.kind == "jsonl" else _text_docs(src, stream, doc_boundary)
                yield from gen
                raw.drain()  # the bytes after the last document still count in the digest
        except IngestError:
            raise
        except Exception as exc:  # noqa: BLE001 - gzip/zlib/zstd/OS errors: the file, not the tool, is at fault
            if not _read_error(exc):
                raise
            raise IngestError(f"cannot read input '{src.path}': {' '.join(str(exc).split())[:200]} (a truncated "
                              "or corrupt compressed file?)") from None
        finally:
            raw.close()
        src.sha256, src.bytes = raw.sha.hexdigest(), raw.nbytes


class BadDocument(Exception):
    """One document that cannot be used; ``where`` and ``reason`` go into the error or the skip list."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def decode_document(doc: RawDoc, text_field: str) -> str:
    """The document's text; raises :class:`BadDocument` naming the file and line/row and the fix."""
    if doc.fmt == "str":
        if not isinstance(doc.payload, str):
            raise BadDocument(doc.where, f"field '{text_field}' is {type(doc.payload).__name__}, not a string "
                                         "(fix the row, or pass --skip-bad-docs to skip and count it)")
        return doc.payload
    payload: bytes = doc.payload  # type: ignore[assignment]
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadDocument(doc.where, f"not UTF-8 (byte {exc.start}: {payload[exc.start:exc.start + 4]!r}); convert "
                                     "it (e.g. iconv -f latin1 -t utf-8) or pass --skip-bad-docs") from None
    if doc.fmt == "text":
        return text
    try:
        row = json.loads(text)
    except ValueError as exc:
        raise BadDocument(doc.where, f"not a JSON line ({exc}); fix the line or pass --skip-bad-docs") from None
    if not isinstance(row, dict) or text_field not in row:
        raise BadDocument(doc.where, f"row has no field '{text_field}' (pass --text-field NAME, or --skip-bad-docs)")
    value = row[text_field]
    if not isinstance(value, str):
        raise BadDocument(doc.where, f"field '{text_field}' is {type(value).__name__}, not a string "
                                     "(fix the row, or pass --skip-bad-docs to skip and count it)")
    return value
