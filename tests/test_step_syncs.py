"""Syncs off the hot path: our collectives and host reads per optimizer step do not grow with grad-accum.

One gloo rank builds the real TrainEngine (tiny model, ZeRO-1) and runs optimizer steps at gradient
accumulation 1 and 4, plus a poisoned (skipped) step at 4. Counted, from our code only (callers under
mcd_scale/): every function of mcd_scale/parallel/collectives.py, and the host reads ``Tensor.item``, ``tolist``,
``cpu``, ``numpy``, ``bool``/``float``/``int`` of a tensor. On a GPU each of those waits for the device.
"""
from __future__ import annotations

import os

from tests.mp import run_ranks

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def _count_worker(accums):
    import collections
    import inspect
    import sys

    import torch

    from mcd_scale.parallel import collectives
    from mcd_scale.parallel.distributed import init_distributed
    from mcd_scale.training.engine import TrainEngine
    from mcd_scale.training.objectives import MdlmObjective
    from tests.test_model_tp import tiny_cfg

    ours = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mcd_scale") + os.sep
    counts: collections.Counter = collections.Counter()
    counting = [False]

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            if counting[0] and sys._getframe(1).f_code.co_filename.startswith(ours):
                counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    # Host reads: patched on the class, counted when the direct caller is a file of ours.
    for name in READS:
        setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    # Collectives: every public function of the module, counted at its entry (inner calls are not: they come
    # from collectives.py itself, which is ours too, so count the outermost call only).
    depth = [0]
    for name, fn in inspect.getmembers(collectives, inspect.isfunction):
        if fn.__module__ != collectives.__name__ or name in ("initialized", "world_size", "rank", "comm_device"):
            continue

        def outer(*args, _fn=fn, _name=name, **kwargs):
            if counting[0] and depth[0] == 0:
                counts["collective:" + _name] += 1
            depth[0] += 1
            try:
                return _fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        setattr(collectives, name, outer)

    dims = init_distributed(tp=1, pp=1)
    result = {}
    for ga in accums:
        cfg = tiny_cfg(["model.layers=1", "model.hidden=64", "model.heads=2", "model.ffn_hidden=128",
                        "model.seq_len=16", "model.vocab_size=64", "parallel.micro_batch=2",
                        f"parallel.global_batch={2 * ga}", "schedule.warmup_steps=0"])
        objective = MdlmObjective(cfg, dims)
        engine = TrainEngine(cfg, dims, objective.loss)
        gen = torch.Generator().manual_seed(0)

        def batches(step):
            out = []
            for m in range(ga):
                micro = {"ids": torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len), generator=gen),
                         "sample_id": torch.arange(2) + 2 * m, "position": torch.arange(2) + 2 * m}
                out.append(objective.prepare(micro, step))
            return out

        engine.train_step(batches(0))  # warm-up (lazy optimizer state), not counted
        for label, poison in (("clean", False), ("skipped", True)):
            prepared = batches(1)
            counts.clear()
            counting[0] = True
            loss, skipped, _ = engine.train_step(prepared, poison=poison)
            counting[0] = False
            result[(ga, label)] = dict(counts=dict(counts), loss=loss, skipped=skipped)
    return result


def test_collectives_and_host_reads_per_step_do_not_grow_with_grad_accum():
    res = run_ranks("tests.test_step_syncs:_count_worker", 1, {"accums": [1, 4]}, timeout=400)[0]
    for label in ("clean", "skipped"):
        one, four = res[(1, label)], res[(4, label)]
        coll1 = sum(v for k, v in one["counts"].items() if k.startswith("collective:"))
        coll4 = sum(v for k, v in four["counts"].items() if k.startswith("collective:"))
        reads1 = sum(v for k, v in one["counts"].items() if not k.startswith("collective:"))
        reads4 = sum(v for k, v in four["counts"].items() if not k.startswith("collective:"))
        detail = f"{label}: ga=1 {one['counts']}, ga=4 {four['counts']}"
        assert coll4 == coll1 and reads4 == reads1, "syncs grow with grad-accum: " + detail
        assert coll1 == 1 and reads1 <= 1, "more than one collective / host read per step: " + detail
        assert one["skipped"] == four["skipped"] == (label == "skipped"), detail
    assert res[(4, "clean")]["loss"] == res[(4, "clean")]["loss"]  # a finite mean loss came back
