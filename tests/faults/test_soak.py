"""Soak (docs/reliability.md, "Forced restarts"): a teacher and a distill run are killed or preempted at random
steps again and again, each time resumed from their last checkpoint, while every rank logs the sample ids it
consumes (``MCD_FAULT_SAMPLE_LOG``). From the logs: 0 samples lost or duplicated in any epoch, re-executed steps
saw the same samples, and the final losses equal an uninterrupted run's. CI forces 2 restarts per run;
``tools/dev/faults.py`` (MCD_FAULTS_LONG=1) forces 10.
"""
from __future__ import annotations

import collections
import json
import os
import random

import pytest

from tests.faults import common

RESTARTS = 10 if common.long_variant() else 2
EVERY = 3  # checkpoint.every


def plan_restarts(steps: int, restarts: int, seed: int) -> list:
    """[(kind, step)] at random steps, each after the checkpoint the previous attempt leaves (so every attempt
    reaches its fault): 'kill' = kill -9 on every rank after the step (the resume restarts from the last
    multiple of checkpoint.every); 'preempt' = SIGTERM after the step (the next step carries the flag, saves
    and exits 4)."""
    rng = random.Random(seed)
    plan, ckpt = [], 0
    first = rng.randint(0, 1)
    for i in range(restarts):
        lo, hi = ckpt + 1, min(steps - 2, ckpt + EVERY + 1)
        if lo > hi:
            break
        step, kind = rng.randint(lo, hi), ("kill", "preempt")[(first + i) % 2]
        plan.append((kind, step))
        ckpt = (step // EVERY) * EVERY if kind == "kill" else step + 1
    return plan


def account(log_dir: str, world: int, global_batch: int, num_samples: int, steps: int) -> dict:
    """Lost/duplicated samples per epoch from the per-rank sample logs (the last record of each step wins)."""
    last, replays, replay_mismatch = {}, 0, 0
    for r in range(world):
        with open(os.path.join(log_dir, f"rank{r}.jsonl"), encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                k = (r, row["step"])
                if k in last:
                    replays += 1
                    replay_mismatch += (last[k]["ids"], last[k]["pos"]) != (row["ids"], row["pos"])
                last[k] = row
    per_epoch = collections.defaultdict(list)
    for s in range(1, steps + 1):
        positions = []
        for r in range(world):
            row = last.get((r, s))
            assert row is not None, f"rank {r} never logged step {s}"
            positions += row["pos"]
            for sid, j in zip(row["ids"], row["pos"]):
                per_epoch[((s - 1) * global_batch + j) // num_samples].append(sid)
        assert sorted(positions) == list(range(global_batch)), f"step {s}: positions {sorted(positions)}"
    lost = dup = 0
    full_epochs = (steps * global_batch) // num_samples
    for e, ids in per_epoch.items():
        dup += len(ids) - len(set(ids))
        if e < full_epochs:
            lost += num_samples - len(set(ids))
    return {"lost": lost, "duplicated": dup, "full_epochs": full_epochs, "replayed_steps": replays,
            "replay_mismatch": replay_mismatch}


@pytest.mark.parametrize("kind", ["teacher", pytest.param("student", marks=pytest.mark.skipif(
    not common.long_variant(), reason="long variant (tools/dev/faults.py): 4+ more launches"))])
def test_forced_restarts_lose_and_duplicate_no_sample(kind, corpus, teacher, tmp_path):
    """CI: 2 restarts of the teacher, sample accounting only. Long variant: 10 restarts of each, and the losses
    compared with an uninterrupted run (one more launch each)."""
    import json as _json

    num_samples = _json.load(open(os.path.join(corpus, "manifest.json")))["splits"]["train"]["num_samples"]
    world, gb = 2, 32
    epochs = 4 if common.long_variant() else 2  # room for 10 restarts in the long variant
    steps = -(-epochs * num_samples // gb) + 1  # a little over `epochs` epochs
    sets = [f"train.steps={steps}", f"checkpoint.every={EVERY}", "parallel.micro_batch=16",
            f"parallel.global_batch={gb}", "checkpoint.keep_last=2"]
    full_dir, soak_dir = str(tmp_path / "full"), str(tmp_path / "soak")
    compare = common.long_variant()
    if compare:
        full = common.launch(common.train_argv(kind, full_dir, corpus, teacher, sets), world, timeout=300)
        assert full.codes == [0] * world, full.log
    plan = plan_restarts(steps, RESTARTS, seed=hash(kind) % 1000 if common.long_variant() else 7)
    log_dir = str(tmp_path / "samples")
    for what, step in plan:
        env = {"MCD_FAULT_SAMPLE_LOG": log_dir,
               ("MCD_FAULT_EXIT_AT_STEP" if what == "kill" else "MCD_FAULT_SIGTERM_AT_STEP"): str(step)}
        res = common.launch(common.train_argv(kind, soak_dir, corpus, teacher, sets), world, env=env, timeout=300)
        want = [9] * world if what == "kill" else [4] * world
        assert res.codes == want, (what, step, res.codes, res.log[-6000:])
    last = common.launch(common.train_argv(kind, soak_dir, corpus, teacher, sets), world,
                         env={"MCD_FAULT_SAMPLE_LOG": log_dir}, timeout=300)
    assert last.codes == [0] * world, last.log
    acc = account(log_dir, world, gb, num_samples, steps)
    assert acc["full_epochs"] >= 2 and acc["replay_mismatch"] == 0, acc
    assert acc["lost"] == 0 and acc["duplicated"] == 0, acc
    ls = common.losses(soak_dir)
    assert sorted(ls) == list(range(1, steps + 1)) and all(common.finite(v) for v in ls.values()), ls
    if compare:
        lf = common.losses(full_dir)
        assert sorted(lf) == sorted(ls)
        assert all(lf[s] == ls[s] for s in lf), [(s, lf[s], ls[s]) for s in lf if lf[s] != ls[s]]
    common.record(f"forced restarts ({kind})", restarts=len(plan), plan=plan, steps=steps, **acc,
                  losses_equal_uninterrupted=True if compare else "not compared (CI variant)")
