"""A tiny prepared corpus and a 2-step single-process teacher run with a checkpoint (shared fixture code
of the checkpoint/entry-point tests; ~10 s on one CPU core)."""
from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys

from tests.mp import REPO, base_env

TINY = ["model.vocab_size=512", "model.seq_len=32", "model.hidden=32", "model.layers=2", "model.heads=2",
        "model.ffn_hidden=64", "parallel.micro_batch=2", "parallel.global_batch=4", "train.eval_every=0",
        "logging.tensorboard=false", "train.log_every=1"]


def run(argv: list, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=base_env(env), capture_output=True, text=True,
                          timeout=timeout)


def prepare(tmp) -> str:
    with gzip.open(os.path.join(REPO, "data", "austen.txt.gz"), "rt", encoding="utf-8") as fh:
        text = fh.read(60_000)
    src = os.path.join(tmp, "corpus.txt")
    with open(src, "w", encoding="utf-8") as fh:
        fh.write(text)
    out = os.path.join(tmp, "prepared")
    res = run(["tools/prepare_data.py", src, "--out", out, "--vocab-size", "512", "--seq-len", "32", "--no-progress"])
    assert res.returncode == 0, res.stderr
    return out


def train_argv(run_dir: str, data: str, *overrides: str) -> list:
    argv = ["-m", "mcd_scale.train", "--config", "configs/tiny/teacher.yaml", "--set", f"data.path={data}",
            "--set", f"run.dir={run_dir}"]
    for o in TINY + list(overrides):
        argv += ["--set", o]
    return argv


def train(run_dir: str, data: str, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run(train_argv(run_dir, data, *overrides), env=env)


def tree_digest(path: str) -> dict:
    """{relative path: sha256} of every file under ``path`` (a run directory before/after a failed launch)."""
    out = {}
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def pickle_payload(target_pt: str, marker: str) -> None:
    """Replace ``target_pt`` with a pickle that creates ``marker`` when unpickled (weights_only=False)."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (marker, "w"))

    with open(target_pt, "wb") as fh:
        pickle.dump({"module": Payload()}, fh)
