"""Training telemetry: rank-0 console line, TensorBoard scalars, metrics.jsonl, loss-curve PNG.

Throughput figures:
- tokens/s = global_batch x seq_len / step wall time (all ranks together).
- TFLOP/s per device = flops_per_token x tokens/s / world_size / 1e12, with flops_per_token from
  :func:`mcd_scale.model.flops.training_flops_per_token` (the 6N + attention formula, named there).
- MFU = TFLOP/s per device / ``logging.peak_tflops`` (null when no peak is configured, e.g. on CPU).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional


class MetricsLogger:
    """Writes on global rank 0 only; every other rank gets a no-op logger."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True, total_steps: int = 0):
        self.enabled = enabled
        self.run_dir = run_dir
        self.total_steps = total_steps
        self._tb = None
        self._jsonl = None
        self._t0 = time.time()
        self._start_step: Optional[int] = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tb"))

    def eta_s(self, step: int) -> Optional[float]:
        if self._start_step is None:
            self._start_step, self._t0 = step, time.time()
            return None
        done = step - self._start_step
        if done <= 0:
            return None
        rate = (time.time() - self._t0) / done
        return rate * max(self.total_steps - step, 0)

    def log(self, step: int, record: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) and k != "loss" else v)
                 for k, v in record.items()}
        row = {"step": step, "split": prefix, **clean, "time": round(time.time(), 3)}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and v is not None and math.isfinite(float(v)):
                    self._tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def console(self, text: str) -> None:
        if self.enabled and not os.environ.get("MCD_QUIET_CONSOLE"):
            print(text, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_loss_curves(run_dir: str) -> Optional[str]:
    """loss.png next to metrics.jsonl: training loss and validation NELBO vs step."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rows = read_metrics(path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train" and r.get("loss") is not None]
    val = [(r["step"], r["nelbo"]) for r in rows if r.get("split") == "val" and r.get("nelbo") is not None]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation NELBO / token", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.legend()
    ax.grid(alpha=0.3)
    out = os.path.join(run_dir, "loss.png")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
