"""DeepSpeed's CPU shm all-reduce op leaks a ~66 MiB /dev/shm file per rank per run (never unlinked).

/dev/shm is RAM: a day of test-suite and demo runs left 312 such files (21 GiB of 24) and the machine
thrashed. Our start-up switches the op off (training never uses it); this checks that no run leaves
a buffer behind and that the op was not even built.
"""
from __future__ import annotations

import os

from tests.mp import run_ranks


def _start_and_reduce() -> dict:
    import torch
    import torch.distributed as dist

    from mcd_scale.parallel.distributed import init_distributed, shutdown

    dims = init_distributed(tp=1, pp=1)
    t = torch.ones(3)
    dist.all_reduce(t)
    out = {"port": os.environ["MASTER_PORT"], "sum": t.tolist(), "dp": dims.dp,
           "shm_op_loaded": hasattr(torch.ops, "deepspeed") and hasattr(torch.ops.deepspeed, "inference_all_reduce_")}
    shutdown()
    return out


def test_start_up_leaves_no_shared_memory_buffers():
    results = run_ranks("tests.test_no_shm_leak:_start_and_reduce", world_size=2, timeout=180)
    assert [r["sum"] for r in results] == [[2.0, 2.0, 2.0]] * 2
    assert all(r["dp"] == 2 for r in results)
    assert not any(r["shm_op_loaded"] for r in results)
    port = results[0]["port"]
    if os.path.isdir("/dev/shm"):
        leaked = [n for n in os.listdir("/dev/shm") if f"_{port}_" in n and n.startswith("deepspeed")]
        assert leaked == [], f"DeepSpeed left shared-memory buffers behind: {leaked}"
