"""Corpus -> tokenizer + fixed-length token shards (train / val / heldout): streaming, parallel, resumable.

The pipeline behind ``tools/prepare_data.py`` (docs/data.md is the reference):

1. Sources (:mod:`mcd_scale.data.ingest`) are read once, in corpus order, in bounded memory.
2. The tokenizer: ``train`` fits a SentencePiece BPE on the first ``tokenizer_sample_bytes`` of documents
   (deterministic; the whole corpus when it is smaller), anything else is resolved by
   :func:`mcd_scale.data.tokenizer.load_tokenizer`. Its files are copied into the output directory.
3. Documents go to ``workers`` processes in chunks of ``chunk_docs``; results come back in submission
   order, so the output is the same bytes for any worker count. Workers decode (UTF-8, JSON) and encode.
4. Each document's split is a keyed hash of its index (:mod:`mcd_scale.data.packing`); each split packs
   its own documents (``wrap`` or ``pad``) and writes a shard whenever ``samples_per_shard`` sequences
   are ready. Sample id = index in the split; documents and sequences keep corpus order.
5. After a chunk that finished a shard, a checkpoint (``.prepare-state/``: the position, the packers'
   carries, the unwritten sequences, the shard records) is written atomically; a rerun with the same
   flags resumes there and ends with the same bytes as an uninterrupted run. ``manifest.json`` is
   written last; ``heldout.txt`` (the held-out sequences decoded) just before it.
"""
from __future__ import annotations

import collections
import json
import os
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence
import multiprocessing as mp

import numpy as np
import sentencepiece
from tqdm import tqdm

from mcd_scale.cli import InputError
from mcd_scale.data.prepare_worker import (decode_rows, encode_chunk, worker_init, write_shard,
                                           writer_init)
from mcd_scale.data.ingest import BadDocument, IngestError, SourceInfo, decode_document, find_sources, iter_documents
from mcd_scale.data.loader import SPLITS, TOKENS_FORMAT, TOKENS_FORMAT_VERSION
from mcd_scale.data.manifest import manifest_path, sha256_file, write_manifest
from mcd_scale.data.packing import PACKS, Packer, SplitAssigner, smallest_keys, token_dtype
from mcd_scale.data.shards import ShardedDataset
from mcd_scale.data.tokenizer import (TextTokenizer, TokenizerError, load_tokenizer, train_tokenizer,
                                      training_lines)

TOOL_VERSION = "2"
STATE_DIR = ".prepare-state"
DEFAULT_TOKENIZER_SAMPLE_BYTES = 100_000_000
ENCODERS_PER_WRITER = 8  # shard-writing processes: one per this many encoding workers (see _Encoder)
_SHARD_NAME = re.compile(r"^shard-\d{6}\.(tar|idx\.npy)(\.tmp)?$")


class PrepareError(InputError):
    """Bad input or flags: printed as one line, exit code 2."""


@dataclass
class PrepareOptions:
    inputs: Sequence[str]
    out: str
    tokenizer: str = "train"  # "train" | a tokenizer source for load_tokenizer
    vocab_size: int = 4096  # for "train" only
    seq_len: int = 128
    seed: int = 1234
    val: float = 0.05  # < 1: a fraction of documents; >= 1: a count
    heldout: float = 0.05
    samples_per_shard: int = 1024
    pack: str = "wrap"
    text_field: str = "text"
    doc_boundary: str = "blank-line"
    dataset_split: str = "train"
    tokenizer_sample_bytes: int = DEFAULT_TOKENIZER_SAMPLE_BYTES
    skip_bad_docs: bool = False
    workers: int = 1
    chunk_docs: int = 512
    chunk_bytes: int = 1 << 20  # a chunk also ends at this many payload bytes (not a flag: see _chunks)
    force: bool = False
    progress: bool = True
    display_root: str = ""  # source paths inside it are recorded relative to it (the repo)
    checkpoint_hook: object = field(default=None, repr=False)  # tests: called after each checkpoint

    def flags(self, sources: list[SourceInfo], given: Optional[TextTokenizer]) -> dict:
        """Everything that decides the output bytes (not --workers, --chunk-docs, --out, --force)."""
        return {"sources": [[_display(s.path, self.display_root), s.kind] for s in sources],
                "tokenizer": "train" if given is None else _tokenizer_identity(given, self.tokenizer),
                "vocab_size": self.vocab_size if self.tokenizer == "train" else None,
                "seq_len": self.seq_len, "seed": self.seed, "val": self.val, "heldout": self.heldout,
                "samples_per_shard": self.samples_per_shard, "pack": self.pack, "text_field": self.text_field,
                "doc_boundary": self.doc_boundary, "dataset_split": self.dataset_split,
                "tokenizer_sample_bytes": self.tokenizer_sample_bytes if self.tokenizer == "train" else None,
                "skip_bad_docs": self.skip_bad_docs, "tool_version": TOOL_VERSION}


def _display(path: str, root: str) -> str:
    full = os.path.abspath(path)
    if root and full.startswith(os.path.abspath(root) + os.sep):
        return os.path.relpath(full, root)
    return full if os.path.exists(path) else path


def _tokenizer_identity(tok: TextTokenizer, source: str) -> str:
    """A tokenizer flag as it enters the fingerprint: a local one by its files' digests (so a moved copy of
    the same tokenizer is the same flag), a hub name as given."""
    if tok.files:
        return "files:" + ",".join(f"{n}={sha256_file(p)}" for n, p in sorted(tok.files.items()))
    return f"hub:{source}"


# ---------------------------------------------------------------------------------------------- workers
class _Encoder:
    """Chunks in, results out in submission order; at most ``2 * workers`` chunks in flight (bounded memory).
    With more than one worker there are two pools: ``workers`` encoders (which also decode ``heldout.txt``) and
    ``writer_pool``, the processes that write the shards (:class:`_SplitWriter`): one per
    :data:`ENCODERS_PER_WRITER` encoders, because a writer writes a 1024-token sequence ~15x faster than an
    encoder makes it (measured: ~130 us against ~1.9-2.2 ms)."""

    def __init__(self, workers: int, init_args: tuple, loaded: Optional[TextTokenizer] = None):
        self.pool = self.writer_pool = None
        self.pending: collections.deque = collections.deque()
        self.limit = 2 * workers
        if workers > 1:
            # spawn: a forked child would inherit the parent's tokenizer thread pools (and their locks)
            ctx = mp.get_context("spawn")
            self.pool = ctx.Pool(workers, initializer=worker_init, initargs=(*init_args, None, True))
            self.writer_pool = ctx.Pool(-(-workers // ENCODERS_PER_WRITER), initializer=writer_init)
        else:
            worker_init(*init_args, loaded=loaded)

    def submit(self, first: int, chunk: list[tuple]):
        """Yields (first document index, result) of the chunks that are done, oldest first."""
        if self.pool is None:
            yield first, encode_chunk(chunk)
            return
        self.pending.append((first, self.pool.apply_async(encode_chunk, (chunk,))))
        while len(self.pending) >= self.limit:
            f, r = self.pending.popleft()
            yield f, r.get()

    def drain(self):
        while self.pending:
            f, r = self.pending.popleft()
            yield f, r.get()

    def decoded(self, rows: Iterator[np.ndarray], batch: int = 64) -> Iterator[str]:
        """The texts of ``rows`` in order (the pool's workers decode batches of them, when there is a pool)."""
        batches = _batched(rows, batch)
        if self.pool is None:
            for b in batches:
                yield from decode_rows(b)
        else:
            for texts in self.pool.imap(decode_rows, batches):
                yield from texts

    def close(self) -> None:
        for pool in (self.pool, self.writer_pool):
            if pool is not None:
                pool.terminate()
                pool.join()


def _batched(rows: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


# ---------------------------------------------------------------------------------------------- writing
class _SplitWriter:
    """One split's shards. Every ``samples_per_shard`` sequences make a shard, written by the writer pool when
    there is one (``pool``: at most ``max_inflight`` shards handed out and not yet written) or here. ``records`` holds
    the written shards, in order; ``next_id`` is the number of samples in them. A checkpoint saves the
    sequences of the shards still in flight as not written (:meth:`unwritten`): a resumed run writes them again,
    the same bytes under the same names."""

    def __init__(self, out: str, name: str, samples_per_shard: int, pool=None, max_inflight: int = 2):
        self.dir = os.path.join(out, name)
        self.spp = samples_per_shard
        self.pool, self.max_inflight = pool, max_inflight
        self.buffer: list[np.ndarray] = []
        self.records: list[dict] = []
        self.next_id = 0
        self.inflight: collections.deque = collections.deque()  # (sequences [n, L], AsyncResult), oldest first

    def add(self, seq: np.ndarray) -> None:
        self.buffer.append(seq)
        if len(self.buffer) >= self.spp:
            self.hand_out_full()

    def hand_out_full(self) -> None:
        """Every full shard of the buffer (after a resume it may hold several) to the writer."""
        while len(self.buffer) >= self.spp:
            seqs, self.buffer = self.buffer[:self.spp], self.buffer[self.spp:]
            self._hand_out(seqs)

    def flush(self) -> None:
        """The last, short shard; then wait until every shard is written."""
        if self.buffer:
            seqs, self.buffer = self.buffer, []
            self._hand_out(seqs)
        while self.inflight:
            self._collect_oldest()

    def _hand_out(self, seqs: list[np.ndarray]) -> None:
        block = np.stack(seqs)
        number = len(self.records) + len(self.inflight)
        first_id = self.next_id + sum(len(b) for b, _ in self.inflight)
        if self.pool is None:
            self._written(write_shard(self.dir, number, first_id, block))
            return
        self.inflight.append((block, self.pool.apply_async(write_shard, (self.dir, number, first_id, block))))
        while len(self.inflight) > self.max_inflight:
            self._collect_oldest()

    def _collect_oldest(self) -> None:
        _, result = self.inflight.popleft()
        self._written(result.get())

    def _written(self, record: dict) -> None:
        self.records.append(record)
        self.next_id += record["num_samples"]

    def poll(self) -> None:
        """Takes the records of the shards written by now, in order, without waiting."""
        while self.inflight and self.inflight[0][1].ready():
            self._collect_oldest()

    def unwritten(self) -> list[np.ndarray]:
        """The sequences not yet in a written shard, in order: those of the shards in flight, then the buffer."""
        return [row for block, _ in self.inflight for row in block] + self.buffer

    def settle(self) -> None:
        """On the way out after an error: let the shards in flight finish (their errors are not this one's), so
        no temporary file of ours is left half-written when the pool is stopped."""
        while self.inflight:
            self.inflight.popleft()[1].wait()  # wait() does not raise: a write's own error is not the one to report


def _write_bytes(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


class _State:
    """The checkpoint under ``out/.prepare-state``: state.json names the generation of its pending arrays,
    and is replaced last, so a kill at any point leaves the previous checkpoint whole."""

    def __init__(self, out: str):
        self.dir = os.path.join(out, STATE_DIR)
        self.path = os.path.join(self.dir, "state.json")

    def load(self) -> Optional[dict]:
        if not os.path.isfile(self.path):
            return None
        with open(self.path, encoding="utf-8") as fh:
            st = json.load(fh)
        for split in SPLITS:
            p = os.path.join(self.dir, st["pending"][split])
            st["pending_arrays"] = st.get("pending_arrays", {})
            st["pending_arrays"][split] = list(np.load(p, allow_pickle=False)) if os.path.isfile(p) else []
        return st

    def save(self, st: dict, pending: dict[str, list[np.ndarray]], seq_len: int, dtype: np.dtype) -> None:
        os.makedirs(self.dir, exist_ok=True)
        gen = int(st["generation"])
        names = {}
        for split in SPLITS:
            arr = np.stack(pending[split]) if pending[split] else np.zeros((0, seq_len), dtype)
            names[split] = f"pending-{split}-{gen:08d}.npy"
            tmp = os.path.join(self.dir, names[split] + ".tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
            os.replace(tmp, os.path.join(self.dir, names[split]))
        st = dict(st, pending=names)
        _write_bytes(self.path, json.dumps(st, sort_keys=True).encode("utf-8"))
        for name in os.listdir(self.dir):  # older generations: ours, superseded by the state just written
            if name.startswith("pending-") and name not in names.values():
                os.remove(os.path.join(self.dir, name))

    def remove(self) -> None:
        if os.path.isdir(self.dir):
            for name in os.listdir(self.dir):
                if name == "state.json" or name.startswith("pending-") or name.endswith(".tmp"):
                    os.remove(os.path.join(self.dir, name))
            if not os.listdir(self.dir):
                os.rmdir(self.dir)


def _our_files(out: str) -> list[str]:
    """Files this tool writes in ``out`` (what --force may remove): shards, indexes, their temporaries,
    the tokenizer copies, heldout.txt, the manifest and the checkpoint."""
    found = []
    for split in SPLITS:
        d = os.path.join(out, split)
        if os.path.isdir(d):
            found += [os.path.join(d, n) for n in sorted(os.listdir(d)) if _SHARD_NAME.match(n)]
    for name in ("tokenizer.model", "heldout.txt", "manifest.json", "manifest.json.tmp", "tokenizer.model.tmp",
                 "heldout.txt.tmp"):
        if os.path.isfile(os.path.join(out, name)):
            found.append(os.path.join(out, name))
    tokdir = os.path.join(out, "tokenizer")
    if os.path.isdir(tokdir):
        found += [os.path.join(tokdir, n) for n in sorted(os.listdir(tokdir))
                  if n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json") or n.endswith(".tmp")]
    return found


def _remove_ours(out: str) -> None:
    _State(out).remove()
    for p in _our_files(out):
        os.remove(p)


# ---------------------------------------------------------------------------------------------- the run
def _check_options(o: PrepareOptions) -> None:
    if o.seq_len < 2 or o.samples_per_shard < 1 or (o.tokenizer == "train" and o.vocab_size < 8):
        raise PrepareError(f"need --seq-len >= 2, --vocab-size >= 8, --samples-per-shard >= 1 "
                           f"(got {o.seq_len}, {o.vocab_size}, {o.samples_per_shard})")
    if o.pack not in PACKS:
        raise PrepareError(f"--pack must be one of {', '.join(PACKS)} (got {o.pack})")
    if o.workers < 1 or o.chunk_docs < 1 or o.chunk_bytes < 1:
        raise PrepareError(f"--workers and --chunk-docs must be >= 1 (got {o.workers}, {o.chunk_docs})")
    for flag, v in (("--val-docs", o.val), ("--heldout-docs", o.heldout)):
        if v < 0 or (v >= 1 and v != int(v)):
            raise PrepareError(f"{flag} must be a fraction in [0, 1) or a whole count (got {v})")
    if o.val < 1 and o.heldout < 1 and o.val + o.heldout >= 1:
        raise PrepareError(f"--val-docs {o.val} and --heldout-docs {o.heldout} leave no training documents")
    if (o.val >= 1) != (o.heldout >= 1) and o.val > 0 and o.heldout > 0:
        raise PrepareError("--val-docs and --heldout-docs must both be fractions or both be counts")
    if o.tokenizer_sample_bytes < 1:
        raise PrepareError(f"--tokenizer-sample-bytes must be >= 1 (got {o.tokenizer_sample_bytes})")


def _train(o: PrepareOptions, sources: list[SourceInfo]) -> bytes:
    """SentencePiece on the first ``tokenizer_sample_bytes`` of documents, in corpus order."""
    docs, total = [], 0
    for doc in iter_documents(sources, o.text_field, o.doc_boundary, o.dataset_split):
        try:
            text = decode_document(doc, o.text_field)
        except BadDocument as bad:
            if not o.skip_bad_docs:
                raise PrepareError(str(bad)) from None
            continue
        docs.append(text)
        total += len(text.encode("utf-8"))
        if total >= o.tokenizer_sample_bytes:
            break
    if not docs:
        raise PrepareError(f"inputs {', '.join(s.path for s in sources)[:200]} hold no document")
    try:
        return train_tokenizer(training_lines(docs), o.vocab_size)
    except TokenizerError as exc:
        raise PrepareError(str(exc)) from None


def _install_tokenizer(o: PrepareOptions, sources: list[SourceInfo], resumed: Optional[dict],
                       tok: Optional[TextTokenizer]) -> TextTokenizer:
    out = o.out
    if o.tokenizer == "train":
        path = os.path.join(out, "tokenizer.model")
        if not (resumed and os.path.isfile(path) and sha256_file(path) == resumed["tokenizer_sha256"]):
            _write_bytes(path, _train(o, sources))
        return load_tokenizer(path)
    if tok.kind == "sentencepiece":
        shutil.copyfile(list(tok.files.values())[0], os.path.join(out, "tokenizer.model.tmp"))
        os.replace(os.path.join(out, "tokenizer.model.tmp"), os.path.join(out, "tokenizer.model"))
        return load_tokenizer(os.path.join(out, "tokenizer.model"))
    tok.files = tok.save(os.path.join(out, "tokenizer"))  # from now on the run's own copies
    return tok


def _tokenizer_entry(out: str, tok: TextTokenizer) -> dict:
    rel = "tokenizer.model" if tok.kind == "sentencepiece" else "tokenizer"
    files = [{"path": os.path.relpath(p, out), "sha256": sha256_file(p)} for _, p in sorted(tok.files.items())]
    primary = os.path.join(out, "tokenizer.model" if tok.kind == "sentencepiece" else "tokenizer/tokenizer.json")
    entry = {"path": rel, "sha256": sha256_file(primary), "files": files,
             "type": "sentencepiece-bpe" if tok.kind == "sentencepiece" else "hf"}
    return entry | tok.describe() | {"name": tok.name if tok.kind == "hf" and not os.path.isabs(tok.name) else
                                     os.path.basename(tok.name.rstrip(os.sep))}


def _chunks(docs, size: int, start: int, max_bytes: int):
    """Chunks of at most ``size`` documents that end at the first document reaching ``max_bytes`` of
    payload: with long documents a chunk of ``size`` would be a few MB, too few chunks to keep every worker
    busy to the end of a modest corpus. Where chunks end does not change the output, only the checkpoints."""
    chunk, first, nbytes = [], start, 0
    for i, d in enumerate(docs):
        if i < start:
            continue
        chunk.append((d.fmt, d.payload, d.where))
        nbytes += len(d.payload) if isinstance(d.payload, (bytes, str)) else 0
        if len(chunk) == size or nbytes >= max_bytes:
            yield first, chunk
            first, chunk, nbytes = first + len(chunk), [], 0
    if chunk:
        yield first, chunk


def prepare(o: PrepareOptions) -> dict:
    """Run the pipeline; returns the manifest (also when the output was already complete). Bad input raises
    :class:`PrepareError` (one line naming the file, line or row, or flag, and the fix)."""
    try:
        return _prepare(o)
    except (IngestError, TokenizerError) as exc:
        raise PrepareError(str(exc)) from None


def _prepare(o: PrepareOptions) -> dict:
    _check_options(o)
    try:
        sources = find_sources(o.inputs, exclude=o.out)
    except IngestError as exc:
        raise PrepareError(str(exc)) from None
    given = None
    if o.tokenizer != "train":
        try:
            given = load_tokenizer(o.tokenizer)
        except TokenizerError as exc:
            raise PrepareError(str(exc)) from None
    flags = o.flags(sources, given)
    state = _State(o.out)
    os.makedirs(o.out, exist_ok=True)
    existing = None
    if os.path.isfile(manifest_path(o.out)):
        with open(manifest_path(o.out), encoding="utf-8") as fh:
            existing = json.load(fh)
    resumed = None if o.force else state.load()
    if not o.force:
        previous = (existing or {}).get("flags") if existing else (resumed or {}).get("flags")
        if existing is not None and previous == flags and _complete(o.out, existing):
            return existing | {"up_to_date": True}
        kept = existing is not None or any((resumed or {}).get("records", {}).values())
        if kept and previous != flags:
            raise PrepareError(f"'{o.out}' holds the output of other flags or inputs ({_flag_diff(previous, flags)}); "
                               "use another --out, or --force to replace the files this tool wrote there")
        if existing is None and resumed is None and any(p.endswith(".tar") for p in _our_files(o.out)):
            raise PrepareError(f"'{o.out}' holds shards without a manifest or checkpoint (an interrupted older run?); "
                               "use another --out, or --force to replace them")
    if resumed is not None and resumed.get("flags") != flags:
        resumed = None  # a run that kept no shard: nothing to resume, nothing to refuse
    if o.force or existing is not None or resumed is None:
        _remove_ours(o.out)  # only files this tool writes; a fresh start

    t0 = time.time()
    cpu0, children0 = time.process_time(), _children_cpu()  # the benchmark's serial fraction: see docs/performance.md
    tok = _install_tokenizer(o, sources, resumed, given)
    dtype = token_dtype(tok.vocab_size)
    if o.val >= 1 or o.heldout >= 1:  # counts: one bounded pass to rank the documents' keys
        n = sum(1 for _ in iter_documents(sources, o.text_field, o.doc_boundary, o.dataset_split))
        if int(o.val) + int(o.heldout) >= n:
            raise PrepareError(f"only {n} documents: --val-docs {int(o.val)} and --heldout-docs {int(o.heldout)} "
                               "leave no training documents")
        held, val = smallest_keys(o.seed, n, int(o.heldout), int(o.val))
        assigner = SplitAssigner(o.seed, 0, 0, held, val)
    else:
        assigner = SplitAssigner(o.seed, o.heldout, o.val)
    packers = {s: Packer(o.pack, o.seq_len, tok.bos_id, tok.eos_id, tok.pad_id, dtype) for s in SPLITS}
    writers = {s: _SplitWriter(o.out, s, o.samples_per_shard) for s in SPLITS}
    skipped: list[dict] = []
    next_doc, generation, num_bytes = 0, 0, 0
    if resumed:
        next_doc, generation, num_bytes = resumed["next_doc"], resumed["generation"], resumed["num_bytes"]
        skipped = resumed["skipped"]
        for s in SPLITS:
            packers[s].load_state(resumed["packers"][s])
            w = writers[s]
            w.records, w.next_id = resumed["records"][s], resumed["next_id"][s]
            w.buffer = [np.asarray(a, dtype) for a in resumed["pending_arrays"][s]]
            for rec in w.records:
                p = os.path.join(w.dir, rec["name"])
                if not os.path.isfile(p) or os.path.getsize(p) != rec["bytes"] or sha256_file(p) != rec["sha256"]:
                    raise PrepareError(f"shard '{p}' of the interrupted run is missing or changed; rerun with --force")
        print(f"prepare_data: resuming at document {next_doc} ({sum(len(w.records) for w in writers.values())} "
              "shards kept)", file=sys.stderr)  # also under --quiet
    for s in SPLITS:  # temporaries of a killed run: ours, rewritten from the checkpoint
        d = os.path.join(o.out, s)
        if os.path.isdir(d):
            for n in os.listdir(d):
                if _SHARD_NAME.match(n) and n.endswith(".tmp"):
                    os.remove(os.path.join(d, n))

    tok_path = os.path.join(o.out, "tokenizer.model" if tok.kind == "sentencepiece" else "tokenizer")
    encoder = _Encoder(o.workers, (tok_path, o.text_field, o.tokenizer == "train", dtype.name), loaded=tok)
    bar = None
    try:
        for w in writers.values():  # from here on shards are written by the pool's workers, when there is one
            w.pool = encoder.writer_pool
            w.hand_out_full()  # a resumed buffer also holds the shards that were in flight at its checkpoint
        if o.progress:
            bar = tqdm(desc="prepare", unit="doc", initial=next_doc, smoothing=0.1, dynamic_ncols=True)
        t_loop = time.time()
        docs_iter = iter_documents(sources, o.text_field, o.doc_boundary, o.dataset_split)
        run_tokens, run_bytes = 0, 0

        def consume(first: int, result: tuple) -> None:
            nonlocal next_doc, num_bytes, run_tokens, run_bytes
            ids, lengths, bad, nbytes = result
            bad_docs = iter(bad)
            start = 0
            for j, n in enumerate(lengths.tolist()):
                doc_index = first + j
                if n < 0:
                    where, reason = next(bad_docs)
                    if not o.skip_bad_docs:
                        raise PrepareError(f"{where}: {reason}")
                    skipped.append({"document": doc_index, "where": where, "reason": reason})
                    continue
                split = assigner.split(doc_index)
                run_tokens += n + 2
                for seq in packers[split].add(ids[start:start + n]):
                    writers[split].add(seq)
                start += n
            next_doc = first + len(lengths)
            num_bytes += nbytes
            run_bytes += nbytes
            if bar is not None:
                el = max(time.time() - t_loop, 1e-9)
                bar.update(len(lengths))
                bar.set_postfix_str(f"{run_tokens / el:,.0f} tok/s, {run_bytes / el / 1e6:.1f} MB/s", refresh=False)

        def shards_written() -> int:
            return sum(len(w.records) for w in writers.values())

        # shards in the last checkpoint (the resumed one's, or none): a new checkpoint once another is written
        checkpointed = sum(len(resumed["records"][s]) for s in SPLITS) if resumed else 0

        def checkpoint() -> None:
            nonlocal generation, checkpointed
            generation += 1
            checkpointed = shards_written()
            st = {"flags": flags, "generation": generation, "next_doc": next_doc, "num_bytes": num_bytes,
                  "skipped": skipped, "tokenizer_sha256": sha256_file(os.path.join(o.out, "tokenizer.model"))
                  if tok.kind == "sentencepiece" else "",
                  "packers": {s: packers[s].state() for s in SPLITS},
                  "records": {s: writers[s].records for s in SPLITS}, "next_id": {s: writers[s].next_id for s in SPLITS}}
            state.save(st, {s: writers[s].unwritten() for s in SPLITS}, o.seq_len, dtype)
            if o.checkpoint_hook is not None:
                o.checkpoint_hook(st)

        if not resumed:
            checkpoint()  # from here on the directory always names its flags: a kill is resumed, not refused

        def written_a_shard() -> bool:
            for w in writers.values():
                w.poll()
            return shards_written() > checkpointed

        try:
            for first, chunk in _chunks(docs_iter, o.chunk_docs, next_doc, o.chunk_bytes):
                for done_first, result in encoder.submit(first, chunk):
                    consume(done_first, result)
                    if written_a_shard():
                        checkpoint()
            for done_first, result in encoder.drain():
                consume(done_first, result)
                if written_a_shard():
                    checkpoint()
        except IngestError as exc:
            raise PrepareError(str(exc)) from None

        for s in SPLITS:
            for seq in packers[s].finish():
                writers[s].add(seq)
            writers[s].flush()
        counts = {s: writers[s].next_id for s in SPLITS}
        if counts["train"] == 0:
            raise PrepareError(f"no training sequences ({counts}): more text, or smaller --val-docs/--heldout-docs")

        # heldout.txt: the held-out sequences decoded (EOS as a blank line), separated by blank lines
        heldout_path = os.path.join(o.out, "heldout.txt")
        with open(heldout_path + ".tmp", "w", encoding="utf-8") as fh:
            if writers["heldout"].records:
                ds = ShardedDataset(os.path.join(o.out, "heldout"), manifest={
                    "num_samples": writers["heldout"].next_id, "shards": writers["heldout"].records})
                rows = (ds[i]["ids"] for i in range(len(ds)))
                for i, text in enumerate(encoder.decoded(rows)):
                    fh.write(("\n\n" if i else "") + text)
            fh.write("\n")
        os.replace(heldout_path + ".tmp", heldout_path)
    finally:
        for w in writers.values():
            w.settle()
        encoder.close()
        if bar is not None:
            bar.close()

    tokens = sum(p.tokens for p in packers.values())
    manifest = {
        "format": TOKENS_FORMAT,
        "format_version": TOKENS_FORMAT_VERSION,
        "tool": "tools/prepare_data.py",
        "tool_version": TOOL_VERSION,
        "tokenizer": _tokenizer_entry(o.out, tok),
        "vocab_size": tok.vocab_size,
        "mask_id": tok.mask_id,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
        "seq_len": o.seq_len,
        "dtype": dtype.name,
        "seed": o.seed,
        "pack": o.pack,
        "split": {"by": "document", "val": o.val, "heldout": o.heldout},
        "num_documents": next_doc - len(skipped),
        "num_tokens": tokens,
        "pad_tokens": sum(p.pad_tokens for p in packers.values()),
        "truncated_documents": sum(p.truncated_docs for p in packers.values()),
        "truncated_tokens": sum(p.truncated_tokens for p in packers.values()),
        "text_bytes": num_bytes,
        "skipped_documents": skipped,
        "splits": {s: {"dir": s, "num_samples": counts[s], "shards": writers[s].records} for s in SPLITS},
        "heldout_text": {"path": "heldout.txt", "sha256": sha256_file(heldout_path)},
        "sources": [{"path": _display(s.path, o.display_root), "sha256": s.sha256, "bytes": s.bytes}
                    for s in sources],
        "flags": flags,
    }
    if tok.kind == "sentencepiece":
        manifest["sentencepiece_version"] = sentencepiece.__version__
    write_manifest(o.out, manifest)
    state.remove()
    return manifest | {"seconds": time.time() - t0, "main_cpu_s": time.process_time() - cpu0,
                       "worker_cpu_s": _children_cpu() - children0}


def _children_cpu() -> float:
    """CPU seconds of this process's reaped children (the pool's workers, once closed)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _complete(out: str, manifest: dict) -> bool:
    for split in manifest.get("splits", {}).values():
        for rec in split.get("shards", []):
            p = os.path.join(out, split["dir"], rec["name"])
            if not os.path.isfile(p) or os.path.getsize(p) != rec["bytes"]:
                return False
    return True


def _flag_diff(previous: Optional[dict], flags: dict) -> str:
    if not previous:
        return "written by an older version of the tool"
    keys = sorted(k for k in set(previous) | set(flags) if previous.get(k) != flags.get(k))
    return "differs in " + ", ".join(keys)


def split_value(text: str) -> float:
    """``--val-docs`` / ``--heldout-docs``: a fraction (``0.05``) or a count (``1000``)."""
    v = float(text)
    return int(v) if v >= 1 else v

