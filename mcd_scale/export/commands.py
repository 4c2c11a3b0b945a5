"""``tools/convert_ckpt.py``'s subcommands dispatched to the conversion (mcd_scale/export/convert.py) and the
Hugging Face export (mcd_scale/export/export_hf.py); kept apart so that neither of those imports the other's
caller (the export uses the conversion's helpers, one way)."""
from __future__ import annotations

import json

from mcd_scale.checkpoint.integrity import IntegrityError
from mcd_scale.export.convert import consolidate, export, inspect, reshard
from mcd_scale.export.export_hf import export_hf


def run_command(args) -> int:
    """Run one parsed ``tools/convert_ckpt.py`` command; prints its result; returns the exit code."""
    if args.cmd == "inspect":
        info = inspect(args.path)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print_summary(info)
        if isinstance(info["integrity"], dict):
            raise IntegrityError(info["integrity"]["error"])
        return 0
    if args.cmd == "export":
        print(export(args.path, args.out, args.ema, args.force))
    elif args.cmd == "consolidate":
        print(json.dumps(consolidate(args.path, args.out, args.weights, args.dtype, args.force)))
    elif args.cmd == "reshard":
        print(json.dumps(reshard(args.path, args.out, args.tp, args.pp, args.zero, args.world_size, args.force)))
    elif args.cmd == "export-hf":
        print(json.dumps(export_hf(args.path, args.out, args.weights, args.tokenizer, args.force,
                                   license=args.license, datasets=args.dataset, evaluation=args.evaluation,
                                   steps=args.steps, sampler=args.sampler, temperature=args.temperature,
                                   repo_id=args.repo_id)))
    return 0


def print_summary(info: dict) -> None:
    print(f"checkpoint  {info['checkpoint']}")
    print(f"tags        {', '.join(info['tags'])}")
    integ = info["integrity"]
    print(f"integrity   {integ if isinstance(integ, str) else 'BAD: ' + integ['error']}")
    if "train_state" not in info:
        return
    print(f"step        {info['step']}  tokens seen {info['tokens_seen']:,}  "
          f"consumed samples {info['train_state']['consumed_samples']}")
    lay = info["layout"]
    print(f"layout      world {lay['world_size']} = TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']}, "
          f"ZeRO-{lay['zero_stage']}, {lay['precision']}, objective {lay['objective']}"
          f"{'' if lay['deepspeed_files'] else ' (no DeepSpeed files: universal only)'}")
    print(f"parameters  {info['parameters']:,} in {info['tensors']} tensors")
    print(f"universal   {'yes' if info['universal'] else 'no'}   EMA {'yes' if info['ema'] else 'no'}")
    sizes = info["sizes_bytes"]
    print("on disk     " + ", ".join(f"{k} {v / 2 ** 20:.1f} MiB" for k, v in sizes.items() if v))
    for name in ("model.safetensors", "model_ema.safetensors"):
        if name in info:
            print(f"{name:<22}{info[name]['tensors']} tensors, {info[name]['parameters']:,} parameters")
