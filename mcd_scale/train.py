"""Entry point: ``deepspeed mcd_scale/train.py --config FILE [FILE ...] [--set key=value ...]``.

Also ``python -m mcd_scale.train`` under torchrun / srun / mpirun. The config is parsed and
validated before anything else (no process group, no heavy import), so a bad config fails on
every rank within seconds with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Light modules only up to the config check (no torch, no DeepSpeed): a bad config fails on every rank in seconds.
from mcd_scale import EXIT_CONFIG, EXIT_OK  # noqa: E402
from mcd_scale.cli import ArgumentParser, add_config_args, debug, input_error_types, rank_prefix, report  # noqa: E402
from mcd_scale.config import ConfigError, grad_accum, load_config, validate_layout  # noqa: E402
from mcd_scale.distill.disk_plan import disk_plan  # noqa: E402
from mcd_scale.parallel.deepspeed import deepspeed_config  # noqa: E402
from mcd_scale.parallel.distributed import detect_launch_env  # noqa: E402
from mcd_scale.parallel.memory_plan import memory_plan  # noqa: E402
from mcd_scale.training.optim import adamw_options  # noqa: E402
from mcd_scale.training.preflight import check_inputs  # noqa: E402
from mcd_scale.signals import PreemptionFlag, run_entry  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mcd_scale/train.py", description=__doc__)
    add_config_args(p, required=True)
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config (and the layout for --world-size) and exit")
    p.add_argument("--layout-only", action="store_true",
                   help="with --dry-run: validate the config and layout only, not the input paths (data, "
                        "teacher, trajectories, checkpoint), e.g. for an allocation before the data is staged")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: the number of ranks to validate for (default: the launcher's)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="with --dry-run: the device kind the printed optimizer options are for (default: cuda)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def dry_run_report(cfg, world: int, device_type: str) -> dict:
    """What ``--dry-run`` derives for ``world`` ranks: the layout, the DeepSpeed dict, the optimizer
    options on ``device_type``, the per-rank memory plan and the disk plan (checkpoints, a round's
    trajectories; no torch model is built)."""
    memory = memory_plan(cfg, world)
    return {"dp": world // (cfg.parallel.tp * cfg.parallel.pp), "grad_accum": grad_accum(cfg, world),
            "deepspeed": deepspeed_config(cfg, world), "optimizer": adamw_options(cfg, device_type),
            "memory_plan": memory, "disk_plan": disk_plan(cfg, memory["parameters_total"])}


def main(argv=None, process_entry: bool = False) -> int:
    """Train: exit 0 (done), 2 (bad config or input), 3 (diverged), 4 (preempted: checkpoint saved, rerun).

    The preemption handlers are installed here, before any work, not only around the trainer's step loop: a rank
    that leaves :meth:`Trainer.fit` (logger close, plots, process-group shutdown, interpreter exit) before SLURM's
    warning signal reaches it would otherwise be killed by SIGUSR1's default action (exit 138, which no batch
    script accepts as done). A signal before the last step boundary still stops all ranks there (exit 4); one
    after it changes nothing (exit 0). As the process's entry point (``process_entry``: ``deepspeed
    mcd_scale/train.py``, ``python -m mcd_scale.train``) the handlers stay installed until the process exits; an
    in-process caller (the tests) gets its previous handlers back.
    """
    args = build_parser().parse_args(argv)
    return run_entry(lambda preempt: _run(args, preempt), process_entry)


def _run(args, preempt: PreemptionFlag) -> int:
    world = args.world_size or detect_launch_env().world_size
    try:
        cfg = load_config(args.config, args.overrides)
        validate_layout(cfg, world)
    except ConfigError as exc:
        print(f"[rank {detect_launch_env().rank}] config error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    try:  # paths before any heavy import or process group; --dry-run verifies the checkpoint's files too
        inputs = None if (args.dry_run and args.layout_only) else check_inputs(cfg, verify_checkpoint=args.dry_run)
    except input_error_types() as exc:
        if debug():
            raise
        return report("train", exc)
    if args.dry_run:
        print(json.dumps({"ok": True, "inputs": inputs, "world_size": world, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp,
                          **dry_run_report(cfg, world, args.device)}, indent=2))
        return 0
    # heavy (torch, DeepSpeed): imported only once the config and the inputs were checked
    from mcd_scale.training.faults import signal_self_after_work
    from mcd_scale.training.trainer import run_training

    try:
        code = run_training(cfg, preempt=preempt)
        signal_self_after_work()
    except input_error_types() as exc:  # on every rank: a missing/corrupt checkpoint, shard, teacher, a bad layout
        if debug():  # MCD_DEBUG=1: the traceback too
            raise
        return report("train", exc)
    if code == EXIT_OK and preempt.requested:  # after the last step boundary: final checkpoint saved, nothing to rerun
        print(f"{rank_prefix()}train: preemption signal after the run finished; exit 0", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(process_entry=True))  # the preemption handlers stay installed until the process exits
