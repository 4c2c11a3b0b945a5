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
                # lazy: loads torch; importing this module does not need it
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


class ThroughputMeter:
    """Throughput over the steps since the last log line: tokens/s, TFLOP/s per device, MFU and the share of the
    wall time spent waiting for data (the formulas are in this module's docstring)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, world_size: int,
                 peak_tflops: Optional[float], start_step: int):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.world_size, self.peak_tflops = world_size, peak_tflops
        self.last_t, self.last_step, self.wait_s = time.time(), start_step, 0.0

    def add_data_wait(self, seconds: float) -> None:
        self.wait_s += seconds

    def measure(self, step: int) -> dict[str, Optional[float]]:
        """tokens_per_s, tflops, mfu, data_wait_pct since the last call (or the start); starts a new window."""
        now = time.time()
        dt = max(now - self.last_t, 1e-9)
        tps = self.tokens_per_step * (step - self.last_step) / dt
        tflops = self.flops_per_token * tps / self.world_size / 1e12
        peak = self.peak_tflops
        out = {"tokens_per_s": tps, "tflops": tflops, "mfu": (tflops / peak) if peak else None,
               "data_wait_pct": 100.0 * self.wait_s / dt}
        self.last_t, self.last_step, self.wait_s = now, step, 0.0
        return out


def train_console_line(step: int, total_steps: int, record: dict[str, Any], eta_s: Optional[float]) -> str:
    """The rank-0 console line of a logged training step (``record`` as written to metrics.jsonl)."""
    gn = record["grad_norm"]
    return (f"step {step}/{total_steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
            f"gnorm {gn if gn is None else f'{gn:.3f}'} tok/s {record['tokens_per_s']:,.0f} "
            f"data-wait {record['data_wait_pct']:.1f}% eta {format_eta(eta_s)}")


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
    # lazy: loads matplotlib; importing this module does not need it
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
