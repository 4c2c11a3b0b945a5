#!/usr/bin/env python
"""Raw text -> SentencePiece tokenizer + fixed-length token shards (train / val / heldout).

    python tools/prepare_data.py                       # the embedded Austen corpus -> data/prepared/
    python tools/prepare_data.py --out DIR --vocab-size 4096 --seq-len 128 corpus/ more.txt.gz

Inputs are .txt / .txt.gz files or directories of them (searched recursively, name order). Steps:

1. Read every file as strict UTF-8 (``\\r\\n`` -> ``\\n``). A missing, empty, undecodable or
   non-UTF-8 file stops the run with exit code 2 and a message naming the file.
2. Documents = paragraphs (blocks separated by blank lines), text kept exactly.
3. Train a BPE tokenizer deterministically (see mcd_scale/data/tokenizer.py); lines over 4000 bytes
   are cut at whitespace first because SentencePiece silently skips longer training lines.
4. Encode every document, check ``decode(encode(doc)) == doc`` (nothing lost, nothing <unk>),
   concatenate with EOS after each document, cut into sequences of ``--seq-len`` (the last one
   padded with EOS so no text is dropped).
5. Split sequences by a permutation keyed by ``--seed``: heldout (for the independent evaluator;
   never trained on), val, train. Each split keeps corpus order; sample id = index in its split.
6. Write webdataset tar shards per split, ``heldout.txt`` (the held-out sequences decoded, separated
   by blank lines) and ``manifest.json`` last. Same inputs and flags -> byte-identical files.

The mask id is V = the tokenizer's piece count (one past the last piece), recorded as ``mask_id``.
"""
from __future__ import annotations

import gzip
import os
import re
import sys
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # runnable as `python tools/prepare_data.py` from any directory
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import sentencepiece  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mcd_scale.data.loader import SPLITS, TOKENS_FORMAT, TOKENS_FORMAT_VERSION  # noqa: E402
from mcd_scale.data.manifest import manifest_path, sha256_bytes, write_manifest  # noqa: E402
from mcd_scale.data.shards import write_shards  # noqa: E402
from mcd_scale.data.tokenizer import Tokenizer, TokenizerError, train_tokenizer, training_lines  # noqa: E402
from mcd_scale.rng import keyed_generator  # noqa: E402

TOOL_VERSION = "1"
DEFAULT_INPUT = os.path.join(REPO, "data", "austen.txt.gz")
DEFAULT_OUT = os.path.join(REPO, "data", "prepared")
_SHARD_NAME = re.compile(r"^shard-\d{6}\.(tar|idx\.npy)(\.tmp)?$")  # a shard and its index sidecar


class PrepareError(Exception):
    """Bad input or flags: printed as one line, exit code 2."""


@dataclass(frozen=True)
class Source:
    path: str  # as recorded in the manifest (repo-relative when inside the repo)
    text: str
    sha256: str
    nbytes: int


# ----------------------------------------------------------------------------------------------
# Reading


def _display(path: str) -> str:
    full = os.path.abspath(path)
    return os.path.relpath(full, REPO) if full.startswith(REPO + os.sep) else full


def find_inputs(inputs: Sequence[str], exclude: str = "") -> list[str]:
    """Expand directories into their .txt/.txt.gz files (recursive, sorted); keep files as given.
    Files under ``exclude`` (the output directory: its heldout.txt) are never inputs."""
    skip = os.path.abspath(exclude) + os.sep if exclude else None
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(p for root, _dirs, names in os.walk(item) for name in names
                           if name.endswith((".txt", ".txt.gz"))
                           for p in [os.path.join(root, name)]
                           if not (skip and os.path.abspath(p).startswith(skip)))
            if not found:
                raise PrepareError(f"input directory '{item}' holds no .txt or .txt.gz files")
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise PrepareError(f"input '{item}' does not exist (pass .txt/.txt.gz files or directories)")
    return files


def read_source(path: str) -> Source:
    """Read one input as strict UTF-8; errors name the file (and the byte offset)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        data = gzip.decompress(raw) if path.endswith(".gz") else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise PrepareError(f"cannot read input '{path}': {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PrepareError(f"input '{path}' is not UTF-8 (byte {exc.start}: {data[exc.start:exc.start + 4]!r}); "
                           "convert it, e.g. iconv -f latin1 -t utf-8") from None
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    if not text.strip():
        raise PrepareError(f"input '{path}' is empty (no non-whitespace text)")
    return Source(_display(path), text, sha256_bytes(raw), len(raw))


_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")


def split_documents(text: str) -> list[str]:
    """Paragraphs: blocks between blank lines, whitespace-only blocks dropped, text kept exactly."""
    return [block for block in _PARAGRAPH_BREAK.split(text) if block.strip()]


# ----------------------------------------------------------------------------------------------
# Sequences and splits


def pack_sequences(docs_ids: Sequence[Sequence[int]], eos_id: int, seq_len: int) -> tuple[np.ndarray, int]:
    """Concatenate documents (EOS after each) and cut into [n, seq_len]; the tail is EOS-padded.
    Returns (sequences as int64, number of pad tokens)."""
    total = sum(len(d) + 1 for d in docs_ids)
    stream = np.empty(total, dtype=np.int64)
    pos = 0
    for ids in docs_ids:
        stream[pos:pos + len(ids)] = ids
        stream[pos + len(ids)] = eos_id
        pos += len(ids) + 1
    n = -(-total // seq_len)
    pad = n * seq_len - total
    return np.concatenate([stream, np.full(pad, eos_id, dtype=np.int64)]).reshape(n, seq_len), pad


def assign_splits(num_sequences: int, seed: int, val_frac: float, heldout_frac: float) -> dict[str, np.ndarray]:
    """Sequence indices of each split, each sorted (corpus order). A permutation keyed by
    ("data-split", seed) picks heldout first, then val; the rest is train."""
    n_held = max(1, round(num_sequences * heldout_frac)) if heldout_frac > 0 else 0
    n_val = max(1, round(num_sequences * val_frac)) if val_frac > 0 else 0
    if n_held + n_val >= num_sequences:
        raise PrepareError(f"only {num_sequences} sequences: --val-frac {val_frac} and --heldout-frac "
                           f"{heldout_frac} leave no training data (more text, or smaller fractions/--seq-len)")
    perm = torch.randperm(num_sequences, generator=keyed_generator("data-split", seed)).numpy()
    return {"heldout": np.sort(perm[:n_held]), "val": np.sort(perm[n_held:n_held + n_val]),
            "train": np.sort(perm[n_held + n_val:])}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id including the mask id (= vocab_size) fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size + 1 <= 65536 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------------------------
# Output


def _clear_old_outputs(out: str) -> None:
    """Remove a previous run's manifest first (a crash mid-run must not leave a manifest describing
    stale shards) and its shards (fewer shards this time must not leave extras behind). Only files
    this tool writes are touched."""
    for path in (manifest_path(out), manifest_path(out) + ".tmp"):
        if os.path.exists(path):
            os.remove(path)
    for split in SPLITS:
        d = os.path.join(out, split)
        if os.path.isdir(d):
            for name in os.listdir(d):
                if _SHARD_NAME.match(name):
                    os.remove(os.path.join(d, name))


def _write_bytes(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def prepare(inputs: Sequence[str], out: str, vocab_size: int, seq_len: int, seed: int, val_frac: float,
            heldout_frac: float, samples_per_shard: int, progress: bool = True) -> dict:
    """Run the whole pipeline; returns the manifest it wrote."""
    if seq_len < 2 or vocab_size < 8 or samples_per_shard < 1:
        raise PrepareError(f"need --seq-len >= 2, --vocab-size >= 8, --samples-per-shard >= 1 "
                           f"(got {seq_len}, {vocab_size}, {samples_per_shard})")
    if not (0 <= val_frac < 1 and 0 <= heldout_frac < 1):
        raise PrepareError(f"--val-frac and --heldout-frac must be in [0, 1) (got {val_frac}, {heldout_frac})")
    sources = [read_source(p) for p in find_inputs(inputs, exclude=out)]
    docs: list[str] = []
    doc_source: list[int] = []
    for i, src in enumerate(sources):
        found = split_documents(src.text)
        docs.extend(found)
        doc_source.extend([i] * len(found))

    try:
        proto = train_tokenizer(training_lines(docs), vocab_size)
    except TokenizerError as exc:
        raise PrepareError(str(exc)) from None
    os.makedirs(out, exist_ok=True)
    _clear_old_outputs(out)
    tok = Tokenizer(proto, source="tokenizer.model")
    _write_bytes(os.path.join(out, "tokenizer.model"), proto)

    docs_ids: list[list[int]] = []
    chunk = 2048
    for start in tqdm(range(0, len(docs), chunk), desc="encode", unit="chunk", disable=not progress):
        part = docs[start:start + chunk]
        ids = tok.encode(part)
        for j, (doc, doc_ids) in enumerate(zip(part, ids)):
            if tok.sp.decode(doc_ids) != doc:  # identity normalization + byte fallback make this hold
                raise PrepareError(f"document {start + j} of '{sources[doc_source[start + j]].path}' does not "
                                   "round-trip through the tokenizer (please report this input)")
        docs_ids.extend(ids)

    seqs, pad = pack_sequences(docs_ids, tok.eos_id, seq_len)
    dtype = token_dtype(tok.vocab_size)
    splits = assign_splits(len(seqs), seed, val_frac, heldout_frac)
    split_records: dict[str, dict] = {}
    for name in SPLITS:
        rows = splits[name]
        samples = ((gid, {"ids": seqs[row].astype(dtype)}) for gid, row in enumerate(rows))
        samples = tqdm(samples, total=len(rows), desc=f"write {name}", unit="seq", disable=not progress)
        shards = write_shards(os.path.join(out, name), samples, samples_per_shard)
        split_records[name] = {"dir": name, "num_samples": int(len(rows)), "shards": shards}

    heldout_text = "\n\n".join(tok.decode(seqs[row].tolist()) for row in splits["heldout"]) + "\n"
    heldout_bytes = heldout_text.encode("utf-8")
    _write_bytes(os.path.join(out, "heldout.txt"), heldout_bytes)

    manifest = {
        "format": TOKENS_FORMAT,
        "format_version": TOKENS_FORMAT_VERSION,
        "tool": "tools/prepare_data.py",
        "tool_version": TOOL_VERSION,
        "sentencepiece_version": sentencepiece.__version__,
        "tokenizer": {"path": "tokenizer.model", "sha256": sha256_bytes(proto), "type": "sentencepiece-bpe"},
        "vocab_size": tok.vocab_size,
        "mask_id": tok.mask_id,
        "eos_id": tok.eos_id,
        "seq_len": seq_len,
        "dtype": dtype.name,
        "seed": seed,
        "split_fractions": {"val": val_frac, "heldout": heldout_frac},
        "num_documents": len(docs),
        "num_tokens": int(seqs.size - pad),
        "pad_tokens": int(pad),
        "splits": split_records,
        "heldout_text": {"path": "heldout.txt", "sha256": sha256_bytes(heldout_bytes)},
        "sources": [{"path": s.path, "sha256": s.sha256, "bytes": s.nbytes} for s in sources],
    }
    write_manifest(out, manifest)
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mcd_scale.cli import ArgumentParser, add_out_arg, add_quiet_arg, fail, input_errors

    ap = ArgumentParser(prog="tools/prepare_data.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="*", default=[DEFAULT_INPUT], help=".txt/.txt.gz files or directories")
    add_out_arg(ap, default=DEFAULT_OUT, help="output directory", aliases=())
    ap.add_argument("--vocab-size", type=int, default=4096, help="SentencePiece pieces (the mask id is this)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (= model.seq_len)")
    ap.add_argument("--seed", type=int, default=1234, help="keys the split assignment")
    ap.add_argument("--val-frac", type=float, default=0.05)
    ap.add_argument("--heldout-frac", type=float, default=0.05)
    ap.add_argument("--samples-per-shard", type=int, default=1024)
    add_quiet_arg(ap, help="no progress bars")
    args = ap.parse_args(argv)
    try:
        m = prepare(args.inputs, args.out, args.vocab_size, args.seq_len, args.seed, args.val_frac,
                    args.heldout_frac, args.samples_per_shard, progress=not args.quiet)
    except input_errors(PrepareError) as exc:
        return fail("prepare_data", exc)  # one line, exit 2 (MCD_DEBUG=1: the traceback)
    counts = ", ".join(f"{k} {m['splits'][k]['num_samples']}" for k in SPLITS)
    print(f"prepare_data: {m['num_tokens']} tokens, vocab {m['vocab_size']} (mask id {m['mask_id']}), "
          f"seq_len {m['seq_len']}: {counts} sequences -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
