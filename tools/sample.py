#!/usr/bin/env python
"""Sample from a trained MDLM teacher or MCD/SDTT student on one process (docs/method.md §7).

    python tools/sample.py --checkpoint runs/demo/text_teacher --steps 256 --num-samples 8 \
        --tokenizer data/prepared/tokenizer.model --out samples.jsonl

``--checkpoint`` is a run directory (its ``checkpoints/latest`` is used), a checkpoint directory
(``.../checkpoints/step_000200``) or a ``model.safetensors`` file. The weights are the
layout-independent ``model.safetensors`` (``--weights ema``: ``model_ema.safetensors``), so a model
trained with any TP/PP/ZeRO layout samples here at tp=1. The model config is the
``config.resolved.yaml`` saved in the checkpoint (or beside the file), unless ``--config`` is given.

Output: one JSON line per sample ``{"index", "text", "ids"}`` (text decoded with ``--tokenizer`` when
given, else space-separated ids) to ``--out`` (stdout when omitted), and a summary JSON line on stderr
(and ``<out>.summary.json``) with NFE per sample and seconds per sample. Same ``--seed`` and flags give
the same tokens whatever ``--batch-size`` (both samplers key their randomness per sample).
Exit codes: 0 done, 1 error, 2 bad arguments or checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcd_scale.checkpoint.store import checkpoint_root, read_latest  # noqa: E402
from mcd_scale.parallel.device import DeviceFlagError, resolve_device  # noqa: E402
from mcd_scale.config import Config, from_dict, load_config  # noqa: E402
from mcd_scale.diffusion.sampling import REVEAL_ORDERS, SampleResult, ancestral_sample, coupled_sample  # noqa: E402
from mcd_scale.diffusion.schedules import get_schedule  # noqa: E402

WEIGHT_FILES = {"model": "model.safetensors", "ema": "model_ema.safetensors"}


@dataclass
class LoadedModel:
    """A single-process denoiser ready for the samplers."""
    model: torch.nn.Module
    cfg: Config
    weights_path: str
    device: torch.device = torch.device("cpu")  # where the model's parameters live

    @property
    def vocab_size(self) -> int:
        return self.cfg.model.vocab_size

    @property
    def seq_len(self) -> int:
        return self.cfg.model.seq_len

    def denoiser(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(z, t).float()


def resolve_weights(checkpoint: str, weights: str = "model") -> str:
    """Path of the weights file for a run dir, a checkpoint dir or a file (raises FileNotFoundError)."""
    name = WEIGHT_FILES[weights]
    if os.path.isfile(checkpoint):
        return checkpoint
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"--checkpoint '{checkpoint}' does not exist")
    if os.path.isfile(os.path.join(checkpoint, name)):
        return os.path.join(checkpoint, name)
    root = checkpoint_root(checkpoint)
    if os.path.isdir(checkpoint) and os.path.basename(os.path.normpath(checkpoint)) == "checkpoints":
        root = checkpoint
    tag = read_latest(root)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under '{root}' (no 'latest'); train first")
    path = os.path.join(root, tag, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"'{path}' is missing (checkpoint.consolidated off, or no EMA for --weights ema)")
    return path


def load_model(checkpoint: str, config_files: Sequence[str] = (), overrides: Sequence[str] = (),
               weights: str = "model", device: torch.device | str = "cpu") -> LoadedModel:
    """Build the tp=1 model from the checkpoint's resolved config (or ``config_files``) and load weights
    (copied from the host file straight into the parameters on ``device``)."""
    import yaml

    from mcd_scale.model.weights import load_full_state_dict, load_safetensors

    from mcd_scale.checkpoint.integrity import verify_file

    path = resolve_weights(checkpoint, weights)
    verify_file(path)  # against the checkpoint's integrity record (or an export's meta.json) before reading
    if config_files:
        cfg = load_config(list(config_files), list(overrides))
    else:
        resolved = os.path.join(os.path.dirname(path), "config.resolved.yaml")
        if not os.path.isfile(resolved):  # an export written before it carried config.resolved.yaml
            resolved = os.path.join(os.path.dirname(path), "config.yaml")
        if not os.path.isfile(resolved):
            raise FileNotFoundError(f"no config.resolved.yaml beside '{path}'; pass --config")
        with open(resolved, encoding="utf-8") as fh:
            cfg = from_dict(yaml.safe_load(fh), source=resolved)
        if overrides:
            raise ValueError("--set needs --config (the resolved config is used as saved)")
    loaded = single_process_model(cfg, init=False, weights_path=path, device=device)
    load_full_state_dict(loaded.model, load_safetensors(path), None)
    return loaded


def single_process_model(cfg: Config, init: bool, weights_path: str,
                         device: torch.device | str = "cpu") -> LoadedModel:
    """The config's model on one process, fp32, no TP/PP, eval mode (the weights are layout-independent):
    randomly initialised with ``init``, else left for the caller to load."""
    from mcd_scale.model.build import build_model

    cfg.train.precision = "fp32"
    cfg.parallel.activation_checkpointing = False
    model = build_model(cfg, None, init=init, dtype=torch.float32).eval().to(device)
    return LoadedModel(model, cfg, weights_path, torch.device(device))


def sample(loaded: LoadedModel, steps: int, num_samples: int, seed: int, temperature: float = 1.0,
           sampler: str = "ancestral", batch_size: Optional[int] = None, progress: bool = False,
           reveal_order: str = "random", stride: Optional[int] = None) -> SampleResult:
    schedule = get_schedule(loaded.cfg.diffusion.schedule, loaded.cfg.diffusion.eps)
    common = dict(temperature=temperature, batch_size=batch_size,
                  time_conditioned=loaded.cfg.model.time_conditioning, progress=progress, device=loaded.device)
    if sampler == "coupled":
        return coupled_sample(loaded.denoiser, num_samples, loaded.seq_len, steps, loaded.vocab_size, schedule,
                              seed, reveal_order=reveal_order, stride=stride, **common)
    if reveal_order != "random" or stride is not None:
        raise ValueError("--reveal-order/--stride need --sampler coupled (the ancestral sampler draws its "
                         "reveals step by step)")
    return ancestral_sample(loaded.denoiser, num_samples, loaded.seq_len, steps, loaded.vocab_size, schedule,
                            seed, **common)


def check_tokenizer(path: str) -> None:
    from mcd_scale.cli import InputError
    from mcd_scale.data.tokenizer import Tokenizer

    if not os.path.isfile(path):
        raise InputError(f"--tokenizer {path}: no such file; pass the tokenizer.model of the prepared data")
    try:
        Tokenizer.from_file(path)
    except Exception as exc:  # SentencePiece raises plain RuntimeError/OSError for a corrupt model
        raise InputError(f"--tokenizer {path} is not a SentencePiece model ({' '.join(str(exc).split())[:200]}); "
                         f"pass the tokenizer.model of the prepared data") from None


def decode_rows(tokens: torch.Tensor, tokenizer_path: Optional[str]) -> list[str]:
    if tokenizer_path:
        from mcd_scale.data.tokenizer import Tokenizer

        tok = Tokenizer.from_file(tokenizer_path)
        return [tok.decode(row.tolist()) for row in tokens]
    return [" ".join(str(int(i)) for i in row) for row in tokens]


def build_parser() -> argparse.ArgumentParser:
    from mcd_scale.cli import ArgumentParser, add_config_args, add_out_arg, add_quiet_arg

    ap = ArgumentParser(prog="tools/sample.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir or model.safetensors")
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
    ap.add_argument("--batch-size", type=int, default=None, help="default: all samples in one batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default=None,
                    help="where the model runs: cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    add_out_arg(ap, metavar="FILE", help="JSONL file (default: stdout)", aliases=())
    ap.add_argument("--tokenizer", default=None, help="SentencePiece model to decode text (e.g. data/prepared/tokenizer.model)")
    add_quiet_arg(ap)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mcd_scale.cli import fail, input_errors

    args = build_parser().parse_args(argv)
    try:  # every input checked before any sampling: one line, exit 2
        if args.steps < 1 or args.num_samples < 1 or args.temperature <= 0:
            raise ValueError("need --steps >= 1, --num-samples >= 1, --temperature > 0")
        if (args.reveal_order != "random" or args.stride is not None) and args.sampler != "coupled":
            raise ValueError("--reveal-order/--stride need --sampler coupled (the ancestral sampler draws its "
                             "reveals step by step)")
        if args.stride is not None and args.stride < 1:
            raise ValueError(f"--stride must be >= 1, got {args.stride}")
        try:
            device = resolve_device(args.device)
        except DeviceFlagError as exc:
            raise ValueError(str(exc)) from None
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        if args.tokenizer:  # before sampling: a bad tokenizer must not cost the whole run's output
            check_tokenizer(args.tokenizer)
        loaded = load_model(args.checkpoint, args.config, args.overrides, args.weights, device)
    except input_errors(FileNotFoundError, ValueError, KeyError) as exc:
        return fail("sample", exc)
    res = sample(loaded, args.steps, args.num_samples, args.seed, args.temperature, args.sampler,
                 args.batch_size, progress=not args.quiet, reveal_order=args.reveal_order, stride=args.stride)
    texts = decode_rows(res.tokens, args.tokenizer)
    lines = [json.dumps({"index": i, "text": text, "ids": row.tolist()})
             for i, (text, row) in enumerate(zip(texts, res.tokens))]
    summary = {"checkpoint": loaded.weights_path, "sampler": args.sampler, "reveal_order": args.reveal_order,
               "stride": (args.stride or min(args.steps, loaded.seq_len)) if args.reveal_order == "strided" else None,
               "steps": args.steps, "device": str(device),
               "temperature": args.temperature, "seed": args.seed, "num_samples": args.num_samples,
               "seq_len": loaded.seq_len, "nfe": res.nfe, "seconds_per_sample": res.seconds / args.num_samples}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        with open(args.out + ".summary.json", "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    else:
        sys.stdout.write("\n".join(lines) + "\n")
    print(json.dumps(summary), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
