#!/usr/bin/env python
"""Held-out KL from the honest ceiling's per-token targets to each given model (teacher, students, the
multi-draw student): how far each sits from the ceiling on the same states, in nats per masked position.

    python experiments/ceiling/target_kl.py --targets runs/x/md768.val.safetensors \
        teacher=runs/x/teacher/checkpoints/step_001500/model.safetensors mcd=runs/x/mcd/round_1/.../model.safetensors

The targets file is the one multidraw_train.py writes with --targets-cache (PREFIX.val.safetensors); with
--noise (PREFIX.val_noise.safetensors, written by --noise-check) the Jensen-Shannon divergence between the
two independent estimates is printed too: the targets' own Monte Carlo noise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# run as a script from the repository: this checkout's package, not another install's
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mcd_scale.cli import fail, input_errors  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="experiments/ceiling/target_kl.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", required=True, help="PREFIX.val.safetensors from multidraw_train.py --targets-cache")
    ap.add_argument("--noise", default=None, help="PREFIX.val_noise.safetensors from --noise-check")
    ap.add_argument("models", nargs="+", help="NAME=model.safetensors (config.resolved.yaml beside it)")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from mcd_scale.eval.multidraw import (load_model_file, load_targets, target_cross_entropy, target_disagreement,
                                          target_entropy)
    try:
        targets = load_targets(a.targets)
        out = {"targets": a.targets, "states": len(targets.z)}
        V = None
        kls = {}
        for spec in a.models:
            name, sep, path = spec.partition("=")
            if not sep:
                raise ValueError(f"{spec}: give NAME=PATH to a model.safetensors")
            model, cfg = load_model_file(path)
            V = cfg.model.vocab_size
            with torch.no_grad():
                ce = target_cross_entropy(model(targets.z, targets.t), targets, torch.arange(len(targets.z)), V)
            kls[name] = round(float(ce) - target_entropy(targets, V), 4)
        out["target_entropy"] = round(target_entropy(targets, V), 4)
        out["kl_to_targets"] = kls
        if a.noise:
            out["target_noise_js"] = round(target_disagreement(targets, load_targets(a.noise), V), 4)
    except input_errors(FileNotFoundError, ValueError, KeyError) as exc:
        return fail("target_kl", exc)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
