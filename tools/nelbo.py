#!/usr/bin/env python
"""The validation NELBO and perplexity bound of a checkpoint on a prepared split (the trainer's own validation).

    python tools/nelbo.py --checkpoint runs/owt_teacher --split val --batches 64 --out nelbo.json
    torchrun --nproc_per_node 8 tools/nelbo.py --checkpoint runs/owt_teacher --batches 512 --time-samples 4

``--checkpoint``: a run dir, checkpoint dir, exported dir or model.safetensors (mcd_scale/inference.py).
The evaluation set is the first ``--batches`` global batches of the split in id order, each sequence
corrupted at one antithetic time per pass with the trainer's fixed validation key; ``--time-samples K``
averages K passes with seeds train.seed + k (K = 1 is exactly the trainer's ``val/nelbo``). Under a
launcher the global batch is split over the ranks (data parallel); the figure does not depend on the
world size. Prints one JSON object (and writes it to ``--out``): nelbo (nats/token), ppl_bound =
exp(nelbo), and the batches, time samples, tokens, antithetic rule, t_min and seed behind it.
Exit codes: 0 done, 1 error, 2 bad arguments, checkpoint or data.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcd_scale.inference import WEIGHT_FILES  # noqa: E402


def build_parser():
    from mcd_scale.cli import ArgumentParser, add_out_arg, add_quiet_arg

    ap = ArgumentParser(prog="tools/nelbo.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir, exported dir or model.safetensors")
    ap.add_argument("--weights", choices=sorted(WEIGHT_FILES), default="model")
    ap.add_argument("--data", default=None, help="prepared data directory (default: the checkpoint's data.path)")
    ap.add_argument("--split", default="val", help="prepared split to score")
    ap.add_argument("--batches", type=int, default=None, help="global batches scored (default: train.eval_batches)")
    ap.add_argument("--global-batch", type=int, default=None, help="default: the checkpoint's parallel.global_batch")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the checkpoint's parallel.micro_batch")
    ap.add_argument("--time-samples", type=int, default=1,
                    help="passes with independent time/mask keys, averaged (1: the trainer's validation key)")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present; under a "
                                                   "launcher cuda:LOCAL_RANK)")
    add_out_arg(ap, metavar="FILE", help="JSON file (default: stdout only)", aliases=())
    add_quiet_arg(ap)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mcd_scale.cli import fail, input_errors
    from mcd_scale.eval.nelbo_eval import run_nelbo

    args = build_parser().parse_args(argv)
    try:
        for flag in ("batches", "global_batch", "micro_batch"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        if args.time_samples < 1:
            raise ValueError(f"--time-samples must be >= 1, got {args.time_samples}")
        out = run_nelbo(args.checkpoint, data=args.data, split=args.split, batches=args.batches,
                        global_batch=args.global_batch, micro_batch=args.micro_batch,
                        time_samples=args.time_samples, weights=args.weights, device=args.device,
                        progress=not args.quiet)
    except input_errors(FileNotFoundError, ValueError, KeyError) as exc:
        return fail("nelbo", exc)
    if out is not None:  # rank 0
        print(json.dumps(out))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w", encoding="utf-8") as fh:
                json.dump(out, fh, indent=2)
            os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
