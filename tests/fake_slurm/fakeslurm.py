"""A fake SLURM on one machine, for running the real slurm/*.sh scripts in tests.

State lives in $FAKE_SLURM_STATE (required): next_job_id, and per job <id>/ with batch.pid, steps/<srun pid>
(the pids of that step's tasks), requeue (a pending `scontrol requeue`), events.jsonl (steps started with
their task environments, signals delivered, requeues, exit codes).

- ``sbatch [--wait] SCRIPT ARGS``: reads the #SBATCH lines (--nodes, --ntasks-per-node, --cpus-per-task,
  --job-name, --signal=B:USR1@N), runs the script with the batch-step environment and waits (always, as
  ``sbatch --wait``). A requeue re-runs it with SLURM_RESTART_COUNT + 1. FAKE_SLURM_NODES /
  FAKE_SLURM_TASKS_PER_NODE override the allocation. The "time limit" is simulated by markers: every new
  file in $FAKE_SLURM_PREEMPT_DIR (written by mcd_scale.training.faults.pause_for_preemption) makes sbatch deliver
  the --signal the way SLURM does (B: = the batch shell only).
- ``srun [opts] CMD``: one task per (node, task) of the allocation, each with SLURM_PROCID/LOCALID/NODEID,
  SLURM_STEP_ID, SLURMD_NODENAME, its output to ``--output=PATTERN`` (%j %s %t %n %N) when given; the
  node names resolve to loopback (MASTER_ADDR=nodeN -> 127.0.0.1). Signals to srun are
  forwarded to the tasks; --kill-on-bad-exit=1 kills the peers of the first task that exits non-zero.
  Exit code: the largest task exit code (a task killed by signal s counts 128+s).
- ``scontrol show hostnames LIST`` expands node lists (rack[1-2]-gpu[01-04]); ``scontrol requeue ID``.
- ``scancel --signal=SIG [--full] ID``: the job's steps; with --full also the batch shell and its children.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time


def state_dir() -> str:
    d = os.environ.get("FAKE_SLURM_STATE")
    if not d:
        sys.exit("fake slurm: FAKE_SLURM_STATE is not set")
    os.makedirs(d, exist_ok=True)
    return d


def job_dir(job_id: str) -> str:
    d = os.path.join(state_dir(), str(job_id))
    os.makedirs(os.path.join(d, "steps"), exist_ok=True)
    return d


def event(job_id: str, **row) -> None:
    with open(os.path.join(job_dir(job_id), "events.jsonl"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"t": time.time(), **row}) + "\n")


def expand_hostlist(text: str) -> list[str]:
    """'rack[1-2]-gpu[01-04],login1' -> rack1-gpu01 ... rack2-gpu04, login1 (zero padding kept)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    parts.append(cur)
    out: list[str] = []
    for part in filter(None, parts):
        m = re.search(r"\[([^\]]+)\]", part)
        if not m:
            out.append(part)
            continue
        head, tail = part[:m.start()], part[m.end():]
        for item in m.group(1).split(","):
            lo, _, hi = item.partition("-")
            hi = hi or lo
            for i in range(int(lo), int(hi) + 1):
                out += expand_hostlist(head + str(i).zfill(len(lo)) + tail)
    return out


def _nodelist(n: int) -> str:
    return "node1" if n == 1 else f"node[1-{n}]"


# ------------------------------------------------------------------ sbatch
def sbatch(argv: list[str]) -> int:
    args = [a for a in argv if a != "--wait"]
    script, script_args = args[0], args[1:]
    opts = {}
    with open(script, encoding="utf-8") as fh:
        for line in fh:
            m = re.match(r"#SBATCH\s+--([\w-]+)=(\S+)", line)
            if m:
                opts[m.group(1)] = m.group(2)
    nodes = int(os.environ.get("FAKE_SLURM_NODES", opts.get("nodes", "1")))
    per_node = int(os.environ.get("FAKE_SLURM_TASKS_PER_NODE", opts.get("ntasks-per-node", "1")))
    sig_spec = opts.get("signal", "")
    m = re.match(r"(B:)?(\w+)@(\d+)", sig_spec)
    sig_name = m.group(2) if m else "USR1"
    batch_only = bool(m and m.group(1))
    sd = state_dir()
    counter = os.path.join(sd, "next_job_id")
    job_id = int(open(counter).read()) if os.path.exists(counter) else 1001
    with open(counter, "w") as fh:
        fh.write(str(job_id + 1))
    job_id = str(job_id)
    jd = job_dir(job_id)
    preempt_dir = os.environ.get("FAKE_SLURM_PREEMPT_DIR", "")
    delivered_path = os.path.join(sd, "markers_delivered")
    restart = 0
    while True:
        env = dict(os.environ)
        env.update({"SLURM_JOB_ID": job_id, "SLURM_JOBID": job_id, "SLURM_JOB_NAME": opts.get("job-name", "job"),
                    "SLURM_JOB_NODELIST": _nodelist(nodes), "SLURM_NODELIST": _nodelist(nodes),
                    "SLURM_NNODES": str(nodes), "SLURM_JOB_NUM_NODES": str(nodes),
                    "SLURM_NTASKS": str(nodes * per_node), "SLURM_NTASKS_PER_NODE": str(per_node),
                    "SLURM_CPUS_PER_TASK": opts.get("cpus-per-task", "1"), "SLURM_SUBMIT_DIR": os.getcwd(),
                    "SLURM_RESTART_COUNT": str(restart), "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                    "SLURM_NODEID": "0", "SLURMD_NODENAME": "node1"})
        event(job_id, kind="batch_start", restart=restart, nodes=nodes, tasks_per_node=per_node)
        batch = subprocess.Popen(["bash", script, *script_args], env=env, start_new_session=True)
        with open(os.path.join(jd, "batch.pid"), "w") as fh:
            fh.write(str(batch.pid))
        while batch.poll() is None:
            if preempt_dir and os.path.isdir(preempt_dir):
                done = set(open(delivered_path).read().split()) if os.path.exists(delivered_path) else set()
                for name in sorted(os.listdir(preempt_dir)):
                    marker = os.path.join(os.path.abspath(preempt_dir), name)  # one delivery per marker file
                    if marker in done:
                        continue
                    with open(delivered_path, "a") as fh:
                        fh.write(marker + "\n")
                    sig = getattr(signal, "SIG" + sig_name)
                    if batch_only:
                        os.kill(batch.pid, sig)
                    else:
                        signal_steps(job_id, sig)
                        os.kill(batch.pid, sig)
                    event(job_id, kind="time_limit_signal", marker=name, signal=sig_name, batch_only=batch_only)
            time.sleep(0.05)
        rc = batch.returncode
        # The job ends with its batch script: SLURM kills the steps still running (e.g. orphaned by a driver
        # that died), so a requeued run never overlaps the run it resumes.
        leftover = signal_steps(job_id, signal.SIGKILL)
        event(job_id, kind="batch_end", restart=restart, rc=rc, killed_step_tasks=leftover)
        flag = os.path.join(jd, "requeue")
        if os.path.exists(flag) and restart < int(os.environ.get("FAKE_SLURM_MAX_REQUEUES", "5")):
            os.remove(flag)
            event(job_id, kind="requeue", restart=restart + 1)
            restart += 1
            continue
        print(f"fake sbatch: job {job_id} ended with exit code {rc} after {restart} requeue(s)", flush=True)
        return rc if rc >= 0 else 128 - rc


# ------------------------------------------------------------------ srun
def _live_step_pids(job_id: str) -> list[int]:
    steps = os.path.join(job_dir(job_id), "steps")
    pids = []
    for name in os.listdir(steps):
        with open(os.path.join(steps, name)) as fh:
            pids += [int(p) for p in fh.read().split()]
    return pids


def signal_steps(job_id: str, sig: int) -> int:
    n = 0
    for pid in _live_step_pids(job_id):
        try:
            os.kill(pid, sig)
            n += 1
        except ProcessLookupError:
            pass
    return n


def srun(argv: list[str]) -> int:
    kill_on_bad_exit = False
    output = ""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        a = argv[i]
        if a.startswith("--kill-on-bad-exit"):
            kill_on_bad_exit = a.split("=", 1)[1] != "0" if "=" in a else True
        elif a.startswith("--output="):
            output = a.split("=", 1)[1]
        elif a in ("-n", "-N", "-c", "--ntasks", "--nodes"):
            i += 1  # the allocation's shape is used as is
        i += 1
    cmd = argv[i:]
    job_id = os.environ["SLURM_JOB_ID"]
    nodes = int(os.environ.get("SLURM_NNODES", "1"))
    per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", "1"))
    hosts = expand_hostlist(os.environ.get("SLURM_JOB_NODELIST", "node1"))
    world = nodes * per_node
    counter = os.path.join(job_dir(job_id), "next_step_id")
    step_id = int(open(counter).read()) if os.path.exists(counter) else 0
    with open(counter, "w") as fh:
        fh.write(str(step_id + 1))
    procs = []
    master = os.environ.get("MASTER_ADDR", "")
    for rank in range(world):
        node = rank // per_node
        env = dict(os.environ)
        env.update({"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world), "SLURM_LOCALID": str(rank % per_node),
                    "SLURM_NODEID": str(node), "SLURMD_NODENAME": hosts[node], "SLURM_STEP_NODELIST":
                    os.environ.get("SLURM_JOB_NODELIST", "node1"), "SLURM_STEP_NUM_TASKS": str(world)})
        env["SLURM_STEP_ID"] = str(step_id)
        if master in hosts:  # the fake cluster's node names all resolve to this machine
            env["MASTER_ADDR"] = "127.0.0.1"
        out = None
        if output:  # srun's file name patterns: %j job, %s step, %t task, %n node index, %N node name
            path = output
            for key, value in (("%j", job_id), ("%s", str(step_id)), ("%t", str(rank)), ("%n", str(node)),
                               ("%N", hosts[node])):
                path = path.replace(key, value)
            out = open(path, "w")
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True, stdout=out,
                                      stderr=subprocess.STDOUT if out else None))
        if out:
            out.close()
    step_file = os.path.join(job_dir(job_id), "steps", str(os.getpid()))
    with open(step_file, "w") as fh:
        fh.write(" ".join(str(p.pid) for p in procs))
    event(job_id, kind="step_start", cmd=cmd, world=world, master_addr=master,
          srun_cpus_per_task=os.environ.get("SRUN_CPUS_PER_TASK"), kill_on_bad_exit=kill_on_bad_exit,
          tasks=[{"procid": r, "localid": r % per_node, "nodeid": r // per_node, "node": hosts[r // per_node]}
                 for r in range(world)])

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    killed = False
    while [p.poll() for p in procs].count(None):  # poll every task (any() would stop at the first running one)
        if kill_on_bad_exit and not killed and any(p.returncode not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            killed = True
        time.sleep(0.05)
    os.remove(step_file)
    codes = [p.returncode if p.returncode >= 0 else 128 - p.returncode for p in procs]
    event(job_id, kind="step_end", cmd=cmd, codes=codes)
    return max(codes)


# ------------------------------------------------------------------ scontrol / scancel
def scontrol(argv: list[str]) -> int:
    if argv[:2] == ["show", "hostnames"]:
        for h in expand_hostlist(argv[2] if len(argv) > 2 else os.environ.get("SLURM_JOB_NODELIST", "")):
            print(h)
        return 0
    if argv[:1] == ["requeue"]:
        open(os.path.join(job_dir(argv[1]), "requeue"), "w").close()
        event(argv[1], kind="requeue_requested")
        return 0
    print(f"fake scontrol: unsupported {argv}", file=sys.stderr)
    return 1


def scancel(argv: list[str]) -> int:
    sig, full, job_id = signal.SIGTERM, False, None
    for a in argv:
        if a.startswith("--signal="):
            name = a.split("=", 1)[1]
            sig = getattr(signal, name if name.startswith("SIG") else "SIG" + name)
        elif a in ("--full", "-f"):
            full = True
        elif not a.startswith("-"):
            job_id = a
    n = signal_steps(job_id, sig)
    if full:
        pid = int(open(os.path.join(job_dir(job_id), "batch.pid")).read())
        try:
            os.killpg(pid, sig)  # the batch shell and its children (the batch step), as --full does
        except ProcessLookupError:
            pass
    event(job_id, kind="scancel", signal=sig.name, full=full, step_tasks=n)
    return 0


if __name__ == "__main__":
    tool = os.path.basename(sys.argv[1])
    sys.exit({"sbatch": sbatch, "srun": srun, "scontrol": scontrol, "scancel": scancel}[tool](sys.argv[2:]))
