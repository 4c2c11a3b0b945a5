#!/usr/bin/env python
"""Sample from a trained MDLM teacher or MCD/SDTT student; rows go straight into tools/evaluate.py.

    python tools/sample.py --checkpoint runs/demo/text_teacher --steps 256 --num-samples 8 --out samples.jsonl
    torchrun --nproc_per_node 8 tools/sample.py --checkpoint RUN --steps 16 --num-samples 1024 \
        --precision bf16 --out samples.jsonl
    python tools/evaluate.py --samples samples.jsonl --gen-ppl gpt2-large --out report/

``--checkpoint`` is a run directory (its ``checkpoints/latest`` is used), a checkpoint directory
(``.../checkpoints/step_000200``), an exported directory or a ``model.safetensors`` file
(mcd_scale/inference.py). Output: one JSON line per sample with what evaluate.py groups by
(``benchmark``, ``model``, ``round``, ``steps``, ``temperature``, ``sampler``; model and round read from the
checkpoint's config unless ``--model``/``--round`` say otherwise), where it came from (``checkpoint`` tag,
``weights``, ``seed``, ``trained_steps``), the cost (``nfe``, ``seconds_per_sample``) and the sample
(``index`` = global sample id, ``text``, ``ids``). Text is decoded with ``--tokenizer`` (default: the run's
own, found beside the weights or in its prepared data directory; ``--tokenizer none``: ids only). A summary
line goes to stderr and ``<out>.summary.json``. Under torchrun/srun/mpirun each rank samples a block of
ids and rank 0 writes them merged in id order: the same tokens whatever the world size or batch size.
Exit codes: 0 done, 1 error, 2 bad arguments or checkpoint.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcd_scale.diffusion.sampling import REVEAL_ORDERS  # noqa: E402
from mcd_scale.inference import PRECISIONS, WEIGHT_FILES, SampleJob, prepare, run_sampling  # noqa: E402


def build_parser():
    from mcd_scale.cli import ArgumentParser, add_config_args, add_out_arg, add_quiet_arg

    ap = ArgumentParser(prog="tools/sample.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir, exported dir or model.safetensors")
    add_config_args(ap, config_help="model config files, later override earlier (repeatable; default: the "
                                    "checkpoint's own config.resolved.yaml)",
                    set_help="override one field; needs --config (repeatable)")
    ap.add_argument("--weights", choices=sorted(WEIGHT_FILES), default="model")
    ap.add_argument("--steps", type=int, required=True, help="sampling steps (network calls at most)")
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--sampler", choices=["ancestral", "coupled"], default="ancestral")
    ap.add_argument("--reveal-order", choices=list(REVEAL_ORDERS), default="random",
                    help="coupled sampler: which tokens a step reveals together; 'strided' never reveals two "
                         "tokens closer than --stride in one step (docs/diffusion.md)")
    ap.add_argument("--stride", type=int, default=None, help="strided order's spacing (default: min(steps, seq_len))")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=None, help="default: all of a rank's samples in one batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default=None,
                    help="where the model runs: cpu, cuda or cuda:N (default: cuda when present, else cpu; "
                         "under a launcher cuda:LOCAL_RANK)")
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                    help="model weights and activations; bf16 needs CUDA (the draws stay float64 either way)")
    add_out_arg(ap, metavar="FILE", help="JSONL file (default: stdout)", aliases=())
    ap.add_argument("--tokenizer", default=None,
                    help="SentencePiece model to decode text (default: the run's own; 'none': ids only)")
    ap.add_argument("--benchmark", choices=["text", "synthetic"], default=None,
                    help="rows' benchmark (default: text when a tokenizer decodes them, else synthetic)")
    ap.add_argument("--model", default=None, help="rows' model name (default: teacher, or the checkpoint's "
                                                  "distillation objective)")
    ap.add_argument("--round", type=int, default=None, help="rows' round (default: the checkpoint's distill.round)")
    add_quiet_arg(ap)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from mcd_scale.cli import fail, input_errors

    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    job = SampleJob(checkpoint=args.checkpoint, steps=args.steps, num_samples=args.num_samples, seed=args.seed,
                    temperature=args.temperature, sampler=args.sampler, reveal_order=args.reveal_order,
                    stride=args.stride, batch_size=args.batch_size, weights=args.weights,
                    config_files=args.config, overrides=args.overrides, device=args.device,
                    precision=args.precision, tokenizer=args.tokenizer, benchmark=args.benchmark,
                    model=args.model, round=args.round, out=args.out, progress=not args.quiet)
    try:  # every input checked before any sampling: one line, exit 2
        prepared = prepare(job)
    except input_errors(FileNotFoundError, ValueError, KeyError) as exc:
        return fail("sample", exc)
    run_sampling(job, prepared)
    return 0


if __name__ == "__main__":
    sys.exit(main())
