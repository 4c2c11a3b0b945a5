"""The validation NELBO loop: the trainer's validation and tools/nelbo.py's figure are this one function.

The fixed evaluation set is the first ``num_batches`` global batches of the split in id order
(``eval_loader``); micro-batch b is corrupted with the fixed key ``step = EVAL_STEP_BASE + b``; the figure
is the mean over batches of the world-mean loss (mcd_scale/eval/nelbo_eval.py states the time-sample rule).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

from mcd_scale.data import bad_input
from mcd_scale.data.loader import eval_loader, step_batches
from mcd_scale.parallel import collectives

EVAL_STEP_BASE = 10 ** 9
"""Validation's corruption key: batch b uses step EVAL_STEP_BASE + b (never a training step)."""


def validation_nelbo(eval_loss: Callable[[list, Callable], float], objective: Any, dataset: Any, num_batches: int,
                     global_batch: int, micro_batch: int, dp_rank: int, dp: int, time_samples: int = 1,
                     progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """{"nelbo", "ppl_bound", "batches", "time_samples", "tokens"}: the mean NELBO over the first
    ``num_batches`` global batches of ``dataset`` (``eval_loss(prepared micro-batches, loss_fn)`` returns
    their world-mean loss, as ``TrainEngine.eval_loss`` does)."""

    if time_samples < 1:
        raise ValueError(f"time_samples must be >= 1, got {time_samples}")
    passes = []
    for k in range(time_samples):
        loader = eval_loader(dataset, num_batches, global_batch, dp_rank, dp, micro_batch, stand_in=True)
        losses, bad = [], None
        for b, micro in enumerate(step_batches(loader)):
            bad = bad or bad_input.of_step(micro)  # a stand-in took a bad sample's place (mcd_scale/data/bad_input.py)
            prepared = [objective.prepare(m, step=EVAL_STEP_BASE + b, seed_offset=k) for m in micro]
            losses.append(eval_loss(prepared, objective.loss))
            if progress is not None:
                progress(k * num_batches + b + 1, time_samples * num_batches)
        if collectives.any_rank(bad is not None):  # once per pass: every rank stops, nothing logged
            bad_input.stop_every_rank(bad)
        passes.append(sum(losses) / len(losses))
    nelbo = sum(passes) / len(passes)
    seq_len = int(dataset[0]["ids"].shape[-1]) if len(dataset) else 0
    return {"nelbo": nelbo, "ppl_bound": math.exp(min(nelbo, 50.0)), "batches": num_batches,
            "time_samples": time_samples, "tokens": num_batches * global_batch * seq_len}
