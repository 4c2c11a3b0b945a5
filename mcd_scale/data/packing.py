"""Documents -> fixed-length sequences (``wrap`` or ``pad``), and the keyed split of documents.

- ``wrap`` (MDLM/DUO's OpenWebText setting): ``BOS doc EOS`` of every document of a split, concatenated in
  corpus order and cut into ``seq_len`` sequences; only the split's last sequence is padded (``pad_id``).
- ``pad`` (LM1B-style): one document per sequence, ``BOS doc EOS`` cut to ``seq_len`` (the cut counted as a
  truncation) or padded with ``pad_id``.

Splits are per document: ``u = key_to_seed("data-split", seed, doc_index) / 2**63``; a fraction ``f`` takes
the documents with ``u`` in its band (heldout first, then val), so no global permutation and no sequence
shared by two splits. A count ``k`` takes the ``k`` documents of smallest ``u`` (found in one bounded pass).
"""
from __future__ import annotations

import heapq
from typing import Iterable, Iterator, Optional

import numpy as np

from mcd_scale.rng import key_to_seed

PACKS = ("wrap", "pad")


def split_key(seed: int, doc_index: int) -> float:
    """The document's uniform draw in [0, 1), keyed by (purpose, document index, seed)."""
    return key_to_seed("data-split", seed, doc_index) / float(1 << 63)


class SplitAssigner:
    """``split(doc_index)`` -> "heldout" | "val" | "train". Fractions use bands of ``split_key``; counts use
    the explicit index sets chosen by :func:`smallest_keys`."""

    def __init__(self, seed: int, heldout: float, val: float, heldout_set: Optional[set] = None,
                 val_set: Optional[set] = None):
        self.seed, self.heldout, self.val = seed, heldout, val
        self.heldout_set, self.val_set = heldout_set, val_set

    def split(self, doc_index: int) -> str:
        if self.heldout_set is not None:
            if doc_index in self.heldout_set:
                return "heldout"
            return "val" if doc_index in self.val_set else "train"
        u = split_key(self.seed, doc_index)
        if u < self.heldout:
            return "heldout"
        return "val" if u < self.heldout + self.val else "train"


def smallest_keys(seed: int, num_docs: int, k_heldout: int, k_val: int) -> tuple[set, set]:
    """The ``k_heldout`` documents of smallest key (heldout) and the next ``k_val`` (val): a bounded heap."""
    k = k_heldout + k_val
    heap: list[tuple[float, int]] = []  # max-heap of the k smallest, as (-u, -index)
    for i in range(num_docs):
        u = split_key(seed, i)
        if len(heap) < k:
            heapq.heappush(heap, (-u, -i))
        elif -heap[0][0] > u:
            heapq.heapreplace(heap, (-u, -i))
    chosen = sorted((-nu, -ni) for nu, ni in heap)
    return {i for _, i in chosen[:k_heldout]}, {i for _, i in chosen[k_heldout:]}


class Packer:
    """Turns one split's documents into ``[seq_len]`` sequences; carries the partial one between calls."""

    def __init__(self, pack: str, seq_len: int, bos_id: int, eos_id: int, pad_id: int, dtype: np.dtype):
        if pack not in PACKS:
            raise ValueError(f"pack must be one of {PACKS}, got {pack!r}")
        self.pack, self.seq_len, self.dtype = pack, seq_len, np.dtype(dtype)
        self.bos = np.array([bos_id], self.dtype)
        self.eos = np.array([eos_id], self.dtype)
        self.pad_id = pad_id
        self.carry = np.zeros(0, self.dtype)
        self.tokens = 0  # document tokens incl. BOS/EOS that went into sequences
        self.pad_tokens = 0
        self.truncated_docs = 0
        self.truncated_tokens = 0

    def add(self, ids: np.ndarray) -> Iterator[np.ndarray]:
        doc = np.concatenate([self.bos, ids.astype(self.dtype, copy=False), self.eos])
        L = self.seq_len
        if self.pack == "pad":
            if len(doc) > L:
                self.truncated_docs += 1
                self.truncated_tokens += len(doc) - L
                doc = doc[:L]
            self.tokens += len(doc)
            self.pad_tokens += L - len(doc)
            yield np.concatenate([doc, np.full(L - len(doc), self.pad_id, self.dtype)])
            return
        self.tokens += len(doc)
        stream = np.concatenate([self.carry, doc]) if len(self.carry) else doc
        n = len(stream) // L
        for j in range(n):
            yield stream[j * L:(j + 1) * L]
        self.carry = stream[n * L:].copy()

    def finish(self) -> Iterator[np.ndarray]:
        """The last, padded sequence of a ``wrap`` split (nothing for ``pad``)."""
        if len(self.carry):
            pad = self.seq_len - len(self.carry)
            self.pad_tokens += pad
            yield np.concatenate([self.carry, np.full(pad, self.pad_id, self.dtype)])
            self.carry = np.zeros(0, self.dtype)

    def state(self) -> dict:
        return {"carry": self.carry.tolist(), "tokens": self.tokens, "pad_tokens": self.pad_tokens,
                "truncated_docs": self.truncated_docs, "truncated_tokens": self.truncated_tokens}

    def load_state(self, st: dict) -> None:
        self.carry = np.asarray(st["carry"], self.dtype)
        for k in ("tokens", "pad_tokens", "truncated_docs", "truncated_tokens"):
            setattr(self, k, int(st[k]))


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id including the mask id (= vocab_size)."""
    return np.dtype(np.uint16) if vocab_size + 1 <= 65536 else np.dtype(np.uint32)


def iter_sequences(packer: Packer, docs: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    for ids in docs:
        yield from packer.add(ids)
    yield from packer.finish()
