#!/usr/bin/env python
"""Inspect, consolidate, reshard and export mcd_scale checkpoints (docs/checkpoints.md).

    python tools/convert_ckpt.py inspect RUN_OR_CKPT [--json]
    python tools/convert_ckpt.py export RUN_OR_CKPT --out DIR [--ema] [--force]
    python tools/convert_ckpt.py consolidate RUN_OR_CKPT --out DIR [--weights raw|ema] [--dtype fp32|bf16|fp16] [--force]
    python tools/convert_ckpt.py reshard RUN_OR_CKPT --out DIR --tp T --pp P [--zero Z] [--world-size N] [--force]
    python tools/convert_ckpt.py export-hf RUN_OR_CKPT --out DIR [--weights raw|ema] [--tokenizer SRC] [--license L]
        [--dataset NAME ...] [--evaluation FILE] [--steps N] [--sampler ancestral|coupled] [--temperature T] [--repo-id ORG/NAME] [--force]

The logic lives in mcd_scale/export/convert.py and mcd_scale/export/export_hf.py; this file parses
the arguments. No output ever deletes what it did not create (``--force`` replaces only the files a previous
output of this tool listed in its meta.json). Input errors are one line, exit 2 (MCD_DEBUG=1 shows the traceback).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcd_scale.cli import input_errors_exit  # noqa: E402


def main(argv=None) -> int:
    # The tools' one convention (mcd_scale/cli.py): one-line usage errors (exit 2), defaults shown once.
    from mcd_scale.cli import ArgumentParser

    p = ArgumentParser(prog="convert_ckpt.py", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=ArgumentParser)
    pi = sub.add_parser("inspect", help="summarise a run's checkpoint (layout, step, sizes, integrity)")
    pi.add_argument("path", help="run directory, checkpoints directory or checkpoint tag")
    pi.add_argument("--json", action="store_true", help="print the full JSON (with every tensor shape)")
    pe = sub.add_parser("export", help="copy the consolidated weights + config to a directory")
    pe.add_argument("path", help="run directory, checkpoints directory or checkpoint tag")
    pe.add_argument("--out", required=True, help="output directory (new or empty)")
    pe.add_argument("--ema", action="store_true", help="export the EMA weights (distillation students)")
    pc = sub.add_parser("consolidate", help="build model.safetensors from the DeepSpeed shards of any layout")
    pc.add_argument("path", help="run directory, checkpoints directory or checkpoint tag")
    pc.add_argument("--out", required=True, help="output directory (new or empty)")
    pc.add_argument("--weights", choices=("raw", "ema"), default="raw", help="trained or EMA weights")
    pc.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                    help="dtype of the written weights (default: the parameters' own)")
    pr = sub.add_parser("reshard", help="a run directory that resumes training at another TP/PP/ZeRO layout")
    pr.add_argument("path", help="run directory, checkpoints directory or checkpoint tag")
    pr.add_argument("--out", required=True, help="output run directory (new or empty)")
    pr.add_argument("--tp", type=int, required=True, help="target tensor-parallel size")
    pr.add_argument("--pp", type=int, required=True, help="target pipeline-parallel size")
    pr.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None,
                    help="target ZeRO stage (default: the run's)")
    pr.add_argument("--world-size", type=int, default=None,
                    help="ranks the target layout is checked for (default: tp x pp); any DP size resumes")
    ph = sub.add_parser("export-hf", help="a Hugging Face-style directory (AutoModel, trust_remote_code)")
    ph.add_argument("path", help="run directory, checkpoints directory or checkpoint tag")
    ph.add_argument("--out", required=True, help="output directory (new or empty)")
    ph.add_argument("--weights", choices=("raw", "ema"), default="raw", help="trained or EMA weights")
    ph.add_argument("--tokenizer", default=None,
                    help="the run's tokenizer: prepared data dir, tokenizer dir (tokenizer.json) or tokenizer.model "
                         "(default: the run's data.path); a SentencePiece model is converted to tokenizer.json")
    ph.add_argument("--license", default="other", help="model card license (an HF license identifier)")
    ph.add_argument("--dataset", action="append", default=[], metavar="NAME",
                    help="model card dataset (repeatable, e.g. openwebtext)")
    ph.add_argument("--evaluation", default=None, metavar="FILE",
                    help="tools/evaluate.py result rows (JSON or JSONL) to put in the model card")
    ph.add_argument("--steps", type=int, default=None,
                    help="recommended sampling steps (default: 256 for a teacher, 1/dt of the trained round for "
                         "a student)")
    ph.add_argument("--sampler", choices=("ancestral", "coupled"), default="ancestral", help="recommended sampler")
    ph.add_argument("--temperature", type=float, default=1.0, help="recommended sampling temperature")
    ph.add_argument("--repo-id", default=None, metavar="ORG/NAME",
                    help="the Hub repository the card's snippet loads from (default: the --out directory's name)")
    for sp in (pe, pc, pr, ph):
        sp.add_argument("--force", action="store_true",
                        help="replace the files a previous output of this tool wrote in --out (never anything else)")
    args = p.parse_args(argv)
    with input_errors_exit("convert_ckpt"):
        from mcd_scale.export.commands import run_command

        return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
