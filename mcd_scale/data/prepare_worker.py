"""The worker processes of :mod:`mcd_scale.data.prepare`: encode a chunk, write a shard, decode held-out rows.

Kept apart from ``prepare`` and light on imports on purpose: a worker is a spawned interpreter that imports
this module (and re-runs the launching script's top level), and ``prepare``'s imports reach torch (through
:mod:`mcd_scale.rng`), ~2 s of CPU per worker before its first document (measured; docs/performance.md).
The shard writer (webdataset) is imported only by the processes that run :func:`write_shard` (the writer
pool; see ``prepare._Encoder``), never by an encoding worker, and without torch (:func:`writer_init`).

Why shards are not written in the main process: writing a tar member costs ~130 us per sequence in
webdataset's ``TarWriter`` (measured), ~85% of the main process's CPU at scale, which made one main process
the limit of the pipeline at ~12 workers. A shard's bytes depend only on its sequences, its first sample id
and its number, so any process can write any shard; the main process keeps the order of the records.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Optional

import numpy as np

from mcd_scale.data.ingest import BadDocument, RawDoc, decode_document
from mcd_scale.data.tokenizer import TextTokenizer, load_tokenizer

_WORKER: dict = {}
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """A worker of a killed (kill -9) run must not outlive it: it could still be renaming a shard that the
    rerun is rewriting. Linux only (prctl); elsewhere the pool's own pipe closing ends an idle worker."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def worker_init(tokenizer_path: str, text_field: str, roundtrip: bool, dtype: str,
                loaded: Optional[TextTokenizer] = None, in_pool: bool = False) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: --workers is the parallelism
    if in_pool:
        _die_with_parent()
    _WORKER.update(tok=loaded or load_tokenizer(tokenizer_path), text_field=text_field, roundtrip=roundtrip,
                   dtype=np.dtype(dtype))


def writer_init() -> None:
    """A shard-writing process: it only runs :func:`write_shard`. webdataset imports torch only for its
    DataLoader interfaces and puts stand-ins in their place when torch is absent (``webdataset/pytorch.py``);
    blocking the import here, in this process only, saves ~220 MB and ~1.5 s of CPU per writer (measured) and
    leaves the shard bytes unchanged (tests/test_data_resume.py compares them with a run that has torch)."""
    _die_with_parent()
    sys.modules.setdefault("torch", None)  # `import torch` now raises ModuleNotFoundError in this process


def encode_chunk(items: list[tuple]) -> tuple:
    """Decode and encode one chunk of ``(fmt, payload, where)``. Returns ``(ids, lengths, bad, text bytes)``:
    the documents' ids concatenated into one array of the token dtype, each document's length (-1 for a bad
    one), and the bad ones' ``(where, reason)`` in order. One buffer per chunk, not one array per document:
    the pool pickles the result here and unpickles it in the main process, the serial part of the pipeline."""
    tok: TextTokenizer = _WORKER["tok"]
    texts, slots, bad = [], [], {}
    nbytes = 0
    for k, (fmt, payload, where) in enumerate(items):
        try:
            text = decode_document(RawDoc(fmt, payload, where), _WORKER["text_field"])
        except BadDocument as exc:
            bad[k] = (exc.where, exc.reason)
            continue
        nbytes += len(payload) if isinstance(payload, bytes) else len(text.encode("utf-8"))
        slots.append(k)
        texts.append(text)
    encoded, good = [], []
    for slot, text, ids in zip(slots, texts, tok.encode(texts)):
        if _WORKER["roundtrip"] and tok._decode_run(ids.tolist()) != text:
            bad[slot] = (items[slot][2], "does not round-trip through the tokenizer (please report this input)")
        else:
            encoded.append(ids)
            good.append(slot)
    lengths = np.full(len(items), -1, np.int64)
    lengths[good] = [len(ids) for ids in encoded]
    dtype = _WORKER["dtype"]
    ids = np.concatenate(encoded).astype(dtype, copy=False) if encoded else np.zeros(0, dtype)
    return ids, lengths, [bad[k] for k in sorted(bad)], nbytes


def write_shard(out_dir: str, shard_number: int, first_id: int, sequences: np.ndarray) -> dict:
    """Write ``sequences`` (``[n, seq_len]``) as shard ``shard_number`` with sample ids ``first_id ...``; returns
    its manifest record. The same arguments give the same bytes in any process."""
    from mcd_scale.data.shards import write_shards  # webdataset imports torch: only where shards are written

    samples = ((first_id + j, {"ids": sequences[j]}) for j in range(len(sequences)))
    records = write_shards(out_dir, samples, len(sequences), first_shard=shard_number)
    assert len(records) == 1, records
    return records[0]


def decode_rows(rows: np.ndarray) -> list[str]:
    """Each row of token ids as text (EOS as a blank line): the lines of ``heldout.txt``."""
    tok: TextTokenizer = _WORKER["tok"]
    return [tok.decode(row) for row in rows]
