#!/usr/bin/env python
"""Launcher probe: check that mcd_scale starts and builds its parallel groups under YOUR launcher.

Run it exactly the way you would run training, with the layout you plan to use::

    torchrun --standalone --nproc_per_node 8 tools/dev/launch_probe.py --tp 2 --pp 2
    deepspeed --num_gpus 8 tools/dev/launch_probe.py --tp 2 --pp 2
    srun -N 2 --ntasks-per-node 8 python tools/dev/launch_probe.py --tp 8 --pp 2
    mpirun -np 8 python tools/dev/launch_probe.py --tp 2          # or MPICH: mpiexec -n 8 ...

Each rank calls ``mcd_scale.parallel.distributed.init_distributed(tp, pp)`` (the same start-up as training),
then runs an all-reduce on its tensor-, data- and pipeline-parallel groups and on the world:
summing the global ranks must give the sum of the group's members, and summing ones its size.
Each rank prints ONE line of JSON to stdout (``"probe": "mcd_scale.launch_probe"``)::

    {"probe": "mcd_scale.launch_probe", "ok": true, "launcher": "torchrun", "started_by": "deepspeed",
     "rank": 3, "world_size": 4, "local_rank": 3, "coords": {"pp": 1, "dp": 0, "tp": 1},
     "groups": {"tp": [2, 3], "dp": [3], "pp": [1, 3]}, "master_addr": "127.0.0.1", ...}

``launcher`` is the family :func:`mcd_scale.parallel.distributed.detect_launch_env` recognised (``torchrun``
covers every launcher that sets RANK/WORLD_SIZE, including ``deepspeed``; ``slurm``; ``mpi``;
``single``); ``started_by`` is a finer guess from the environment the launcher left behind.
Exit code 0 when every check passed on this rank, 1 otherwise (the JSON line is printed either way,
with ``"errors"``). Set ``--timeout`` low to turn a hung rendezvous into a quick failure.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

PROBE_TAG = "mcd_scale.launch_probe"


def started_by(env: dict) -> str:
    """Best guess at the program that started this process, from the variables it sets."""
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "CROSS_RANK" in env and "RANK" in env:  # deepspeed/launcher/launch.py
        return "deepspeed"
    if "RANK" in env and "WORLD_SIZE" in env:
        return "env"  # RANK/WORLD_SIZE set by something else (a test harness, mp.spawn, a wrapper)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return "srun"
    if "OMPI_COMM_WORLD_RANK" in env:
        return "mpirun (Open MPI)"
    if "PMI_RANK" in env:
        return "mpiexec (MPICH/Hydra)"
    if "PMIX_RANK" in env:
        return "mpirun (PMIx)"
    return "none"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds before a collective (or the rendezvous) gives up (default 120)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _check_group(name: str, group, members: list[int], rank: int, errors: list[str]) -> None:
    import torch

    from mcd_scale.parallel import collectives

    t = collectives.all_reduce(torch.tensor([float(rank), 1.0], dtype=torch.float64, device=collectives.comm_device()),
                               "sum", group=group)
    want = [float(sum(members)), float(len(members))]
    if t.tolist() != want:
        errors.append(f"all-reduce on the {name} group {members} gave (sum of ranks, size) = "
                      f"{t.tolist()}, expected {want}")


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    env_before = dict(os.environ)
    from mcd_scale.parallel.distributed import detect_launch_env, init_distributed, shutdown

    le = detect_launch_env(env_before)
    record: dict = {"probe": PROBE_TAG, "ok": False, "launcher": le.launcher,
                    "started_by": started_by(env_before), "rank": le.rank, "world_size": le.world_size,
                    "local_rank": le.local_rank, "hostname": socket.gethostname(), "pid": os.getpid(),
                    "tp": args.tp, "pp": args.pp}
    errors: list[str] = []
    try:
        dims = init_distributed(tp=args.tp, pp=args.pp, timeout_s=args.timeout)
        import torch.distributed as dist

        pp_rank, dp_rank, tp_rank = dims.coords()
        groups = {name: sorted(dist.get_process_group_ranks(getattr(dims, f"{name}_group")))
                  for name in ("tp", "dp", "pp")}
        record.update({
            "rank": dist.get_rank(), "world_size": dist.get_world_size(),
            "local_rank": int(os.environ.get("LOCAL_RANK", le.local_rank)),
            "dp": dims.dp, "backend": str(dist.get_backend()),
            "coords": {"pp": pp_rank, "dp": dp_rank, "tp": tp_rank}, "groups": groups,
            "master_addr": os.environ.get("MASTER_ADDR"), "master_port": int(os.environ.get("MASTER_PORT", 0)),
        })
        for name, expected in (("tp", dims.tp_ranks()), ("dp", dims.dp_ranks()), ("pp", dims.pp_ranks())):
            if groups[name] != expected:
                errors.append(f"{name} group {groups[name]} != expected {expected}")
            _check_group(name, getattr(dims, f"{name}_group"), groups[name], dims.rank, errors)
        _check_group("world", None, list(range(dims.world_size)), dims.rank, errors)
    except Exception as exc:  # report, do not hide: the JSON line carries the error
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        try:
            shutdown(drain=False)  # no async work queued here, and a failed rank must not hang its peers
        except Exception:  # pragma: no cover
            pass
    record["ok"] = not errors
    if errors:
        record["errors"] = errors
    record["startup_s"] = round(time.time() - t0, 2)
    sys.stdout.write(json.dumps(record) + "\n")  # one write: lines from different ranks never interleave
    sys.stdout.flush()
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
