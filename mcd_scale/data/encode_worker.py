"""The tokenizing workers of :mod:`mcd_scale.data.prepare`: decode (UTF-8, JSON) and encode one chunk.

Kept apart from ``prepare`` and light on imports on purpose: a worker is a spawned interpreter that imports
this module (and re-runs the launching script's top level), and ``prepare``'s imports reach torch (through
:mod:`mcd_scale.rng`), ~2 s of CPU per worker before its first document (measured; docs/performance.md).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from mcd_scale.data.ingest import BadDocument, RawDoc, decode_document
from mcd_scale.data.tokenizer import TextTokenizer, load_tokenizer

_WORKER: dict = {}


def worker_init(tokenizer_path: str, text_field: str, roundtrip: bool, dtype: str,
                loaded: Optional[TextTokenizer] = None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: --workers is the parallelism
    _WORKER.update(tok=loaded or load_tokenizer(tokenizer_path), text_field=text_field, roundtrip=roundtrip,
                   dtype=np.dtype(dtype))


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
