#!/usr/bin/env python
"""Corpus -> tokenizer + fixed-length token shards (train / val / heldout): streaming, parallel, resumable.

    python tools/prepare_data.py                       # the embedded Austen corpus -> data/prepared/
    python tools/prepare_data.py --out DIR --vocab-size 4096 --seq-len 128 corpus/ more.txt.gz
    python tools/prepare_data.py --tokenizer TOKENIZER_DIR --text-field text --pack wrap --workers 8 \\
        --seq-len 1024 --out DIR corpus/*.jsonl.zst

Inputs: .txt, .jsonl and .parquet files (plain, .gz or .zst), local Hugging Face ``datasets`` directories,
a dataset name where the machine is online, or directories of these (recursive, name order). One document
per JSON line / parquet or dataset row; plain text per paragraph (``--doc-boundary blank-line``) or per file.
``--tokenizer train`` fits a SentencePiece BPE on a bounded sample of the corpus; otherwise a tokenizer
directory (``tokenizer.json``), a ``tokenizer.model``, a prepared data directory or a hub name. Documents
are split by a keyed hash of their index, packed (``wrap``: BOS doc EOS concatenated and cut; ``pad``: one
document per sequence) and written as webdataset shards; ``manifest.json`` last. Same inputs and flags ->
byte-identical files for any ``--workers``; a killed run resumes when rerun with the same flags.
The pipeline is mcd_scale/data/prepare.py; docs/data.md is the reference.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # runnable as `python tools/prepare_data.py` from any directory
    sys.path.insert(0, REPO)

DEFAULT_INPUT = os.path.join(REPO, "data", "austen.txt.gz")
DEFAULT_OUT = os.path.join(REPO, "data", "prepared")


def main(argv: Optional[Sequence[str]] = None) -> int:
    # imported here, not at the top: the spawned workers re-run this file's top level, and prepare's imports
    # reach torch (~2 s of CPU per worker)
    from mcd_scale.cli import ArgumentParser, add_out_arg, add_quiet_arg, fail, input_errors
    from mcd_scale.data.prepare import (DEFAULT_TOKENIZER_SAMPLE_BYTES, PrepareError, PrepareOptions, prepare,
                                        split_value)
    from mcd_scale.data.ingest import IngestError
    from mcd_scale.data.loader import SPLITS

    ap = ArgumentParser(prog="tools/prepare_data.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="*", default=[DEFAULT_INPUT],
                    help="files (.txt/.jsonl/.parquet, plain/.gz/.zst), datasets directories or directories of these")
    add_out_arg(ap, default=DEFAULT_OUT, help="output directory", aliases=())
    ap.add_argument("--tokenizer", default="train",
                    help="'train' (SentencePiece on the corpus), a tokenizer directory or file, a prepared data "
                         "directory, or a hub name")
    ap.add_argument("--vocab-size", type=int, default=4096, help="pieces of a trained tokenizer (the mask id is V)")
    ap.add_argument("--tokenizer-sample-bytes", type=int, default=DEFAULT_TOKENIZER_SAMPLE_BYTES,
                    help="--tokenizer train fits on the first this many bytes of documents (corpus order)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (= model.seq_len)")
    ap.add_argument("--pack", choices=("wrap", "pad"), default="wrap",
                    help="wrap: BOS doc EOS concatenated and cut; pad: one document per sequence")
    ap.add_argument("--text-field", default="text", help="the text column of .jsonl/.parquet/datasets inputs")
    ap.add_argument("--doc-boundary", choices=("blank-line", "file"), default="blank-line",
                    help="documents of plain text: paragraphs, or whole files")
    ap.add_argument("--dataset-split", default="train", help="the split of a datasets input that has several")
    ap.add_argument("--seed", type=int, default=1234, help="keys the split assignment")
    ap.add_argument("--val-docs", type=split_value, default=0.05, help="validation documents: a fraction or a count")
    ap.add_argument("--heldout-docs", type=split_value, default=0.05,
                    help="held-out documents (the independent evaluator's; never trained on): a fraction or a count")
    ap.add_argument("--samples-per-shard", type=int, default=1024)
    ap.add_argument("--skip-bad-docs", action="store_true",
                    help="skip (and count, in the manifest) documents that cannot be read instead of stopping")
    ap.add_argument("--workers", type=int, default=1, help="tokenizing processes (the output does not depend on it)")
    ap.add_argument("--chunk-docs", type=int, default=512, help="documents per work item")
    ap.add_argument("--force", action="store_true",
                    help="replace the files this tool wrote in --out (other flags, or a finished run)")
    add_quiet_arg(ap, help="no progress bar")
    args = ap.parse_args(argv)
    opts = PrepareOptions(
        inputs=args.inputs, out=args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size, seq_len=args.seq_len,
        seed=args.seed, val=args.val_docs, heldout=args.heldout_docs, samples_per_shard=args.samples_per_shard,
        pack=args.pack, text_field=args.text_field, doc_boundary=args.doc_boundary, dataset_split=args.dataset_split,
        tokenizer_sample_bytes=args.tokenizer_sample_bytes, skip_bad_docs=args.skip_bad_docs, workers=args.workers,
        chunk_docs=args.chunk_docs, force=args.force, progress=not args.quiet, display_root=REPO)
    try:
        m = prepare(opts)
    except input_errors(PrepareError, IngestError) as exc:
        return fail("prepare_data", exc)  # one line, exit 2 (MCD_DEBUG=1: the traceback)
    counts = ", ".join(f"{k} {m['splits'][k]['num_samples']}" for k in SPLITS)
    done = "already complete" if m.get("up_to_date") else \
        f"{m['seconds']:.1f} s; CPU: main {m['main_cpu_s']:.1f} s, workers {m['worker_cpu_s']:.1f} s"
    print(f"prepare_data: {m['num_documents']} documents ({len(m['skipped_documents'])} skipped), {m['num_tokens']} "
          f"tokens, vocab {m['vocab_size']} (mask id {m['mask_id']}), seq_len {m['seq_len']}, pack {m['pack']}: "
          f"{counts} sequences -> {args.out} ({done})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
