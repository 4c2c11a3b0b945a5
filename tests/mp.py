"""Multi-process test harness: run a function or a CLI on N gloo ranks, never hang CI.

``run_ranks("tests.test_x:fn", world_size=2, kwargs={...})`` starts one fresh Python process per
rank (the same environment torchrun gives: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), calls
``fn(**kwargs)`` in each and returns the per-rank return values (anything torch.save can store).
On timeout the whole process group is killed; a failure on any rank raises with every failing
rank's traceback.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relpath: str, name: str):
    """A script that is not part of the package (a benchmark under tools/bench/, the fake SLURM binaries) as a
    module, loaded by path once, without touching the import path: tests import the package, and exercise a script
    only where the script itself is the unit under test."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("MCD_QUIET", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def _kill(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _spawn_ranks(argv: list, world_size: int, tmp: str, env: Optional[dict]):
    """One ``python argv...`` per rank with torchrun's variables; logs in ``tmp/rank{r}.log``."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world_size):
        e = base_env(env)
        e.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                  "LOCAL_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        log = open(os.path.join(tmp, f"rank{rank}.log"), "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=REPO, env=e, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return procs, logs


def run_ranks(target: str, world_size: int, kwargs: Optional[dict] = None, timeout: float = 240,
              env: Optional[dict] = None) -> list[Any]:
    """Run ``module:function`` on ``world_size`` ranks; return the list of per-rank results."""
    with tempfile.TemporaryDirectory(prefix="mcd_mp_") as tmp:
        torch.save(kwargs or {}, os.path.join(tmp, "kwargs.pt"))
        procs, logs = _spawn_ranks(["-m", "tests._mp_worker", target, tmp], world_size, tmp, env)
        deadline = time.time() + timeout
        try:
            while any(p.poll() is None for p in procs):
                if time.time() > deadline:
                    _kill(procs)
                    raise TimeoutError(f"{target} on {world_size} ranks exceeded {timeout}s; logs:\n"
                                       + _tails(logs))
                if any(p.poll() not in (None, 0) for p in procs):
                    time.sleep(3)  # give peers a moment to report their own error, then stop them
                    _kill(procs)
                    break
                time.sleep(0.05)
        finally:
            _kill(procs)
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if failed:
            raise AssertionError(f"{target}: rank(s) {failed} failed:\n" + _tails(logs))
        return [torch.load(os.path.join(tmp, f"result{r}.pt"), weights_only=False) for r in range(world_size)]


def _tails(logs) -> str:
    out = []
    for r, log in enumerate(logs):
        log.flush()
        log.seek(0)
        text = log.read()
        out.append(f"----- rank {r} -----\n{text[-6000:]}")
    return "\n".join(out)


def run_cli(cmd: Sequence[str], timeout: float = 300, env: Optional[dict] = None,
            cwd: str = REPO) -> subprocess.CompletedProcess:
    """Run a command line (torchrun/deepspeed/mpiexec/python ...) in its own process group with a
    hard timeout. Returns the CompletedProcess (stdout+stderr merged in .stdout)."""
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=base_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill([proc])
        out, _ = proc.communicate()
        raise TimeoutError(f"{' '.join(cmd)} exceeded {timeout}s:\n{out[-8000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def venv_bin(name: str) -> str:
    """Path of a console script installed beside the running interpreter (torchrun, deepspeed, mpiexec)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def run_cli_ranks(argv: Sequence[str], world_size: int, timeout: float = 300,
                  env: Optional[dict] = None) -> tuple[list[int], str]:
    """Start ``python argv...`` once per rank with torchrun's variables (no agent in between, as srun
    does), so each rank's own exit code is observable. Returns (exit codes by rank, merged logs)."""
    with tempfile.TemporaryDirectory(prefix="mcd_cli_") as tmp:
        procs, logs = _spawn_ranks(list(argv), world_size, tmp, env)
        deadline = time.time() + timeout
        try:
            while any(p.poll() is None for p in procs):
                if time.time() > deadline:
                    _kill(procs)
                    raise TimeoutError(f"{' '.join(argv)} on {world_size} ranks exceeded {timeout}s:\n" + _tails(logs))
                time.sleep(0.05)
        finally:
            _kill(procs)
        return [p.returncode for p in procs], _tails(logs)
