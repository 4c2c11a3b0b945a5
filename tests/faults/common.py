"""Shared set-up of the fault suite: a tiny corpus, a tiny teacher file, rank launches with exit times.

Every run is the real CLI (``python -m mcd_scale.train``) on N gloo ranks started without an agent, as
srun starts them, so each rank's own exit code and exit time are observable.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from tests.mp import REPO, _kill, _spawn_ranks, base_env

TEACHER_CFG = os.path.join(REPO, "configs", "tiny", "teacher.yaml")
DISTILL_CFG = os.path.join(REPO, "configs", "tiny", "distill.yaml")
VOCAB, SEQ = 320, 32
TINY = [f"model.vocab_size={VOCAB}", f"model.seq_len={SEQ}", "model.hidden=32", "model.layers=2", "model.heads=2",
        "model.ffn_hidden=64", "train.eval_every=0", "train.log_every=1", "logging.tensorboard=false",
        "optimizer.lr=3e-3", "schedule.warmup_steps=0", "train.seed=11"]
TEACHER = TINY + ["parallel.zero_stage=1", "parallel.micro_batch=2", "parallel.global_batch=4"]
STUDENT = TINY + ["train.objective=mcd", "distill.teacher_mode=online", "distill.round=1", "distill.dt0=0.125",
                  "distill.top_k=16", "parallel.tp=1", "parallel.zero_stage=1", "parallel.micro_batch=2",
                  "parallel.global_batch=4", "train.ema_decay=0"]


def prepare_corpus(tmp: str, sequences: int = 300, samples_per_shard: int = 64) -> str:
    """Prepared shards of a keyed random word corpus (tools/prepare_data.py, vocab 320, seq 32)."""
    import torch

    from mcd_scale.rng import keyed_generator

    words = ["the", "of", "and", "Emma", "Harriet", "said", "very", "well", "Mr.", "Knightley", "not", "she",
             "was", "would", "could", "be", "her", "his", "Miss", "Woodhouse", "Elton", "Jane", "Fairfax"]
    g = keyed_generator("faults-corpus", 0)
    idx = torch.randint(0, len(words), (sequences, 12), generator=g).tolist()
    text = "\n\n".join(" ".join(words[i] for i in row) + "." for row in idx) + "\n"
    src = os.path.join(tmp, "corpus.txt.gz")
    with open(src, "wb") as fh:
        fh.write(gzip.compress(text.encode("utf-8"), mtime=0))
    out = os.path.join(tmp, "prepared")
    proc = subprocess.run([sys.executable, "tools/prepare_data.py", src, "--out", out, "--vocab-size", str(VOCAB),
                           "--seq-len", str(SEQ), "--samples-per-shard", str(samples_per_shard), "--no-progress"],
                          cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def make_teacher(tmp: str) -> str:
    """A freshly initialised tiny model saved as model.safetensors (what a teacher run leaves)."""
    from mcd_scale.config import load_config
    from mcd_scale.model.build import build_model
    from mcd_scale.model.weights import full_state_dict, save_safetensors

    cfg = load_config([TEACHER_CFG], TINY)
    path = os.path.join(tmp, "teacher", "model.safetensors")
    save_safetensors(full_state_dict(build_model(cfg, None, init=True)), path)
    return path


def train_argv(kind: str, run_dir: str, data: str, teacher: Optional[str], overrides=()) -> list:
    cfg = TEACHER_CFG if kind == "teacher" else DISTILL_CFG
    sets = (TEACHER if kind == "teacher" else STUDENT + [f"distill.teacher={teacher}"])
    argv = ["-m", "mcd_scale.train", "--config", cfg]
    for s in [f"data.path={data}", f"run.dir={run_dir}", *sets, *overrides]:
        argv += ["--set", s]
    return argv


@dataclass
class RankRun:
    codes: list  # exit code per rank (None: still running when the harness killed it)
    exit_s: list  # seconds from launch to each rank's exit (None: killed by the harness)
    log: str
    exit_wall: list  # time.time() of each rank's exit (None: killed by the harness)

    def peer_error(self, rank: int = 0) -> str:
        """The error line that ended ``rank`` (gloo's 'Timed out ...' / 'Connection closed ...'), '' if none."""
        part = self.log.split(f"----- rank {rank} -----", 1)[-1].split("----- rank ", 1)[0]
        lines = [x.split("]: ", 1)[-1] for x in part.splitlines() if "Error: " in x]
        return lines[-1][:200] if lines else ""

    def fault_time(self, what: str) -> float:
        """Wall time printed by mcd_scale/training/faults.py when the injected fault struck ('dies'/'hangs')."""
        m = re.search(rf"\[fault\] rank \d+ {what} in step \d+ at ([0-9.]+)", self.log)
        assert m, f"the injected fault ({what}) did not strike:\n{self.log[-4000:]}"
        return float(m.group(1))

    @property
    def text(self) -> str:
        return self.log


def launch(argv: list, world: int, timeout: float = 180, env: Optional[dict] = None,
           stop_after_first_exit_s: Optional[float] = None) -> RankRun:
    """Start ``python argv`` on ``world`` ranks; record each rank's exit code and time.

    ``stop_after_first_exit_s``: once every rank but hung ones has exited, or this long after the first
    non-zero exit, kill what is left (a hung rank never exits by itself)."""
    with tempfile.TemporaryDirectory(prefix="mcd_faults_") as tmp:
        t0 = time.monotonic()
        procs, logs = _spawn_ranks(list(argv), world, tmp, env)
        exit_s: list = [None] * world
        exit_wall: list = [None] * world
        first_bad = None
        try:
            while any(p.poll() is None for p in procs):
                now = time.monotonic()
                for r, p in enumerate(procs):
                    if p.poll() is not None and exit_s[r] is None:
                        exit_s[r], exit_wall[r] = now - t0, time.time()
                        if p.returncode != 0 and first_bad is None:
                            first_bad = now
                if now - t0 > timeout:
                    break
                if stop_after_first_exit_s is not None and first_bad is not None \
                        and now - first_bad > stop_after_first_exit_s:
                    break
                time.sleep(0.02)
            now = time.monotonic()
            for r, p in enumerate(procs):
                if p.poll() is not None and exit_s[r] is None:
                    exit_s[r], exit_wall[r] = now - t0, time.time()
        finally:
            _kill(procs)
        for p in procs:
            p.wait()
        codes = [p.returncode if exit_s[r] is not None else None for r, p in enumerate(procs)]
        text = []
        for r, log in enumerate(logs):
            log.flush()
            log.seek(0)
            text.append(f"----- rank {r} -----\n{log.read()[-8000:]}")
            log.close()
        return RankRun(codes, exit_s, "\n".join(text), exit_wall)


def losses(run_dir: str) -> dict:
    """step -> loss of the LAST record of that step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row.get("split") == "train":
                out[row["step"]] = row["loss"]
    return out


def rows(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(x) for x in fh if x.strip()]


def checkpoint_tags(run_dir: str) -> list:
    root = os.path.join(run_dir, "checkpoints")
    return sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []


def nonfinite_tensors(path: str) -> list:
    """Names of tensors with a NaN/Inf in a safetensors file."""
    import torch
    from safetensors.torch import load_file

    return [k for k, v in load_file(path).items() if v.is_floating_point() and not torch.isfinite(v).all()]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def long_variant() -> bool:
    """``MCD_FAULTS_LONG=1`` (set by tools/dev/faults.py): the long variants (more restarts, more fuzzed inputs)."""
    return os.environ.get("MCD_FAULTS_LONG", "") == "1"


def record(fault: str, **figures) -> None:
    """Append one measured figure set to ``$MCD_FAULTS_REPORT`` (JSON lines; tools/dev/faults.py collects them) and
    print it (visible with ``pytest -s``)."""
    row = {"fault": fault, **figures}
    print(f"\n[faults] {json.dumps(row)}")
    path = os.environ.get("MCD_FAULTS_REPORT", "")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
