"""Start-up under every launcher we support, via tools/dev/launch_probe.py, plus pure unit tests of the
launcher-environment detection.

Multi-process tests (2 gloo ranks each, hard timeouts via tests.mp.run_cli):
  (a) torchrun --standalone --nproc_per_node 2        layout tp=2
  (b) deepspeed --num_gpus 2 (CPU accelerator)         layout pp=2
  (c) simulated srun: SLURM_* variables, no RANK        layout dp=2
  (d) MPICH mpiexec -n 2 from the venv                 layout tp=2 (port agreed over mpi4py)
and a bad config under the deepspeed launcher, which must fail on every rank within seconds.
"""
from __future__ import annotations

import json
import subprocess
import sys
import os
import time

import pytest

from mcd_scale.parallel.distributed import detect_launch_env, first_slurm_host, master_addr_for_hosts
from tests.mp import REPO, free_port, run_cli, venv_bin

PROBE = os.path.join(REPO, "tools", "dev", "launch_probe.py")
TAG = '{"probe": "mcd_scale.launch_probe"'
LAUNCH_TIMEOUT = 240  # hard cap per launch (the machine is shared); typical runs take 10-25 s


# --------------------------------------------------------------------------------------------
# Pure: detect_launch_env / first_slurm_host
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nodelist, first", [
    ("gpu[003-005,009],login1", "gpu003"),
    ("gpu[009,003-005]", "gpu009"),          # the first listed, not the smallest
    ("node17", "node17"),
    ("node17,node02", "node17"),
    ("localhost", "localhost"),
    ("a-b[10-12]", "a-b10"),
    (" gpu[0001-0004] ", "gpu0001"),          # zero padding kept
    ("rack[1-2]-gpu[01-04]", "rack1-gpu01"),  # brackets after the first one belong to the same host
    ("rack[2,1]-gpu[04-05],login1", "rack2-gpu04"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_torchrun_env():
    le = detect_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7",
                            "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x", "GROUP_RANK": "1"})
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port) == \
        ("torchrun", 3, 8, 1, "10.0.0.7", 29400)


def test_deepspeed_launcher_env():
    le = detect_launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "CROSS_RANK": "0",
                            "CROSS_SIZE": "1", "LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.master_port) == ("torchrun", 1, 2, 1, 29500)


def test_torchrun_inside_srun_trusts_rank():
    # torchrun started by srun (one task per node): RANK is the process's rank, SLURM_PROCID the node's.
    le = detect_launch_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu003",
                            "MASTER_PORT": "29500", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"})
    assert (le.launcher, le.rank, le.world_size) == ("torchrun", 5, 8)


def test_srun_env():
    le = detect_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                            "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[003-005,009],login1"})
    assert (le.launcher, le.rank, le.world_size, le.local_rank, le.master_addr) == ("slurm", 5, 16, 1, "gpu003")
    assert le.master_port == 15000 + 123456 % 15000  # derived from the job id: same on every task
    # the step's node list wins over the job's; MASTER_* set by the user win over both
    le = detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7",
                            "SLURM_JOB_NODELIST": "gpu[001-009]", "SLURM_STEP_NODELIST": "gpu[004-005]"})
    assert le.master_addr == "gpu004" and le.master_port == 15007 and le.local_rank == 0
    le = detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[001-009]",
                            "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "12345"})
    assert (le.master_addr, le.master_port) == ("10.1.1.1", 12345)


@pytest.mark.parametrize("env, rank, world, local", [
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, 3, 4, 1),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}, 2, 4, 0),     # MPICH / Hydra
    ({"PMIX_RANK": "1", "PMIX_SIZE": "2", "PMIX_LOCAL_RANK": "1"}, 1, 2, 1),   # PMIx
])
def test_mpi_envs(env, rank, world, local):
    le = detect_launch_env(env)
    assert (le.launcher, le.rank, le.world_size, le.local_rank) == ("mpi", rank, world, local)
    assert le.master_port == 0  # 0 = agree on a free port over MPI at start-up (or MASTER_PORT if set)
    assert le.master_addr == ""  # "" = agree on rank 0's host over MPI at start-up (or MASTER_ADDR if set)
    assert detect_launch_env({**env, "MASTER_PORT": "23456"}).master_port == 23456
    assert detect_launch_env({**env, "MASTER_ADDR": "10.0.0.7"}).master_addr == "10.0.0.7"


def test_master_addr_for_hosts():
    """A multi-node mpirun needs no MASTER_ADDR: rank 0's host; one host: loopback."""
    assert master_addr_for_hosts(["n1", "n1", "n1"]) == "127.0.0.1"
    assert master_addr_for_hosts(["n2", "n2", "n3", "n3"]) == "n2"
    assert master_addr_for_hosts(["n3", "n2"]) == "n3"
    with pytest.raises(ValueError):
        master_addr_for_hosts([])


def test_mpirun_inside_sbatch_uses_the_mpi_rank():
    """`mpirun python train.py` inside an sbatch script: the batch step's SLURM_PROCID=0 /
    SLURM_NTASKS are inherited by every MPI rank, so they must not decide the rank.
    (FAILS on the current mcd_scale/parallel/distributed.py, which checks SLURM before MPI: every rank would
    believe it is rank 0 -- reported to the lead with the fix.)"""
    batch_step = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "99",
                  "SLURM_JOB_NODELIST": "gpu[001-002]"}
    ranks = []
    for r in range(4):
        le = detect_launch_env({**batch_step, "OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": "4",
                                "OMPI_COMM_WORLD_LOCAL_RANK": str(r % 2)})
        ranks.append((le.rank, le.world_size, le.local_rank))
    assert ranks == [(0, 4, 0), (1, 4, 1), (2, 4, 0), (3, 4, 1)]


def test_no_launcher_is_single_process():
    le = detect_launch_env({})
    assert (le.launcher, le.rank, le.world_size, le.local_rank) == ("single", 0, 1, 0)


# --------------------------------------------------------------------------------------------
# Real launches of tools/dev/launch_probe.py
# --------------------------------------------------------------------------------------------
def _records(out: str, world: int) -> list[dict]:
    recs = [json.loads(line[line.index(TAG):]) for line in out.splitlines() if TAG in line]
    assert len(recs) == world, f"expected {world} probe lines, got {len(recs)}:\n{out[-6000:]}"
    return sorted(recs, key=lambda r: r["rank"])


def _check(recs: list[dict], tp: int, pp: int, launcher: str, started_by: str) -> None:
    world = len(recs)
    dp = world // (tp * pp)
    for rank, rec in enumerate(recs):
        assert rec["ok"], rec.get("errors")
        assert (rec["rank"], rec["world_size"], rec["launcher"]) == (rank, world, launcher)
        assert rec["started_by"] == started_by
        assert rec["backend"] == "gloo" and rec["dp"] == dp
        # independent reference for the rank order: tensor fastest, then data, then pipe
        p, d, t = rank // (dp * tp), (rank // tp) % dp, rank % tp
        assert rec["coords"] == {"pp": p, "dp": d, "tp": t}
        assert rec["groups"]["tp"] == [p * dp * tp + d * tp + i for i in range(tp)]
        assert rec["groups"]["dp"] == [p * dp * tp + i * tp + t for i in range(dp)]
        assert rec["groups"]["pp"] == [i * dp * tp + d * tp + t for i in range(pp)]
    assert len({(r["master_addr"], r["master_port"]) for r in recs}) == 1  # everyone met at one place
    assert recs[0]["master_port"] > 0
    assert len({r["pid"] for r in recs}) == world


def test_torchrun_standalone():
    res = run_cli([venv_bin("torchrun"), "--standalone", "--nproc_per_node", "2", PROBE, "--tp", "2",
                   "--timeout", "120"], timeout=LAUNCH_TIMEOUT)
    assert res.returncode == 0, res.stdout[-6000:]
    recs = _records(res.stdout, 2)
    _check(recs, tp=2, pp=1, launcher="torchrun", started_by="torchrun")
    assert [r["local_rank"] for r in recs] == [0, 1]


def test_deepspeed_launcher():
    port = free_port()  # never the default 29500: other jobs on the machine may hold it
    res = run_cli([venv_bin("deepspeed"), "--num_gpus", "2", "--master_port", str(port), PROBE, "--pp", "2",
                   "--timeout", "120"], timeout=LAUNCH_TIMEOUT)
    assert res.returncode == 0, res.stdout[-6000:]
    recs = _records(res.stdout, 2)
    _check(recs, tp=1, pp=2, launcher="torchrun", started_by="deepspeed")
    assert recs[0]["master_port"] == port and [r["local_rank"] for r in recs] == [0, 1]


def test_simulated_srun():
    """Two tasks started the way srun starts them: SLURM_* only, no RANK/WORLD_SIZE/MASTER_ADDR."""
    port = free_port()
    common = (f"SLURM_NTASKS=2 SLURM_JOB_ID=4242 SLURM_JOB_NODELIST=localhost MASTER_PORT={port} "
              f"SLURM_NNODES=1")
    python = venv_bin("python")
    script = (f"env {common} SLURM_PROCID=0 SLURM_LOCALID=0 {python} {PROBE} --timeout 120 & p0=$!; "
              f"env {common} SLURM_PROCID=1 SLURM_LOCALID=1 {python} {PROBE} --timeout 120 & p1=$!; "
              f"wait $p0; r0=$?; wait $p1; r1=$?; exit $((r0 | r1))")
    res = run_cli(["bash", "-c", script], timeout=LAUNCH_TIMEOUT)
    assert res.returncode == 0, res.stdout[-6000:]
    recs = _records(res.stdout, 2)
    _check(recs, tp=1, pp=1, launcher="slurm", started_by="srun")
    assert recs[0]["master_addr"] == "localhost" and recs[0]["master_port"] == port
    assert [r["local_rank"] for r in recs] == [0, 1]


def test_mpiexec_mpich():
    """MPICH's Hydra (the `mpich` wheel puts mpiexec in the venv). No MASTER_PORT is given: rank 0
    picks a free port and broadcasts it over mpi4py."""
    mpiexec = venv_bin("mpiexec")
    assert os.path.exists(mpiexec), "mpiexec missing: `pip install mpich` (see docs/install.md)"
    res = run_cli([mpiexec, "-n", "2", venv_bin("python"), PROBE, "--tp", "2", "--timeout", "120"],
                  timeout=LAUNCH_TIMEOUT)
    assert res.returncode == 0, res.stdout[-6000:]
    recs = _records(res.stdout, 2)
    _check(recs, tp=2, pp=1, launcher="mpi", started_by="mpiexec (MPICH/Hydra)")
    assert recs[0]["master_addr"] == "127.0.0.1"


def test_bad_layout_fails_fast_on_every_rank_under_deepspeed():
    """pp=2 with ZeRO-3 is refused on every rank, before any process group, naming both menus."""
    t0 = time.time()
    res = run_cli([venv_bin("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                   os.path.join(REPO, "mcd_scale", "train.py"), "--config", "configs/tiny/teacher.yaml",
                   "--set", "parallel.pp=2", "--set", "parallel.zero_stage=3"], timeout=LAUNCH_TIMEOUT)
    wall = time.time() - t0
    assert res.returncode != 0, res.stdout[-6000:]
    for rank in (0, 1):
        lines = [ln for ln in res.stdout.splitlines() if f"[rank {rank}] config error:" in ln]
        assert lines, f"rank {rank} printed no config error:\n{res.stdout[-6000:]}"
        msg = lines[0]
        assert "'parallel.pp' = 2" in msg and "'parallel.zero_stage' = 3" in msg
        assert "(a) 3D: TP x PP x DP" in msg and "(b) TP x DP with 'parallel.zero_stage: 3'" in msg
    assert "return code = 2" in res.stdout  # the launcher saw the config exit code (EXIT_CONFIG)
    assert "Traceback" not in res.stdout
    # ~10 s on an idle 2-core machine, ~40 s when it is shared; the failure this guards against is
    # ranks waiting in a collective until its timeout (minutes), so the bound is generous.
    assert wall < 90, f"took {wall:.1f}s"


def test_config_validation_path_does_not_import_torch():
    """A bad config must fail on every rank before a launcher that kills siblings on the first exit
    (DeepSpeed's polls every second) can kill the slower ranks: train.py parses and validates before
    importing torch (~1.5 s here, much more on a loaded machine)."""
    code = ("import sys; import mcd_scale.train, mcd_scale.parallel.distributed; "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"importing mcd_scale.train pulled in torch: {res.stderr[-2000:]}"
