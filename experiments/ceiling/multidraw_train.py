#!/usr/bin/env python
"""Train a student on the honest ceiling's per-token targets (mcd_scale/eval/multidraw.py) and write its
samples at the ceiling's step count as samples JSONL (model "mcd-multidraw").

    python experiments/ceiling/multidraw_train.py --teacher runs/x/teacher/checkpoints/step_001500/model.safetensors \
        --data runs/x/data --out runs/x/samples/multidraw.jsonl
"""
from __future__ import annotations

import argparse
import os
import sys

# run as a script from the repository: this checkout's package, not another install's
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mcd_scale.cli import fail, input_errors  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="experiments/ceiling/multidraw_train.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="model.safetensors (config.resolved.yaml beside it)")
    ap.add_argument("--data", required=True, help="prepared synthetic data (chain.json inside)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--continuation-steps", type=int, default=64)
    ap.add_argument("--train-states", type=int, default=192)
    ap.add_argument("--val-states", type=int, default=32)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--max-epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--targets-cache", default=None,
                    help="prefix of safetensors files holding the targets: read if present (and built with the same "
                         "settings), written otherwise; lets other fits reuse the costly targets")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from mcd_scale.eval.multidraw import run_experiment
    try:
        out = run_experiment(a.teacher, a.data, os.path.join(a.data, "chain.json"), a.out, steps=a.steps,
                             draws=a.draws, groups=a.groups, continuation_steps=a.continuation_steps,
                             train_states=a.train_states, val_states=a.val_states, num_samples=a.num_samples,
                             seed=a.seed, max_epochs=a.max_epochs, lr=a.lr,
                             targets_cache=a.targets_cache, log=lambda m: print(m, flush=True))
    except input_errors(FileNotFoundError, ValueError, KeyError) as exc:
        return fail("multidraw_train", exc)
    print(f"multidraw_train: held-out KL to the targets {out['val_kl_start']:.4f} (the teacher) -> "
          f"{out['best_val_kl']:.4f} (best epoch); target entropy {out['val_target_entropy']:.4f}; "
          f"{out['seconds']:.0f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
