"""Shared by the synthetic-benchmark experiments: the teacher curves of a report, and one row of exact
scores (true NLL with its standard error, entropy, off-support rate, gap closed against those curves)."""
from __future__ import annotations

import json
import math

import numpy as np

from mcd_scale.eval.frontier import gap_closed
from mcd_scale.eval.metrics import per_sample_unigram_entropy

Curve = list[tuple[float, float]]


def teacher_curves(report: str, many_steps: int, few_steps: int, tool: str,
                   flags: str = "--many-steps / --few-steps") -> tuple[Curve, Curve]:
    """(entropy, true NLL) points of the synthetic teacher rows of ``report`` at many and few steps."""
    with open(report, encoding="utf-8") as fh:
        rows = [r for r in json.load(fh) if r["model"] == "teacher" and r.get("benchmark", "synthetic") == "synthetic"]
    many = [(r["entropy"], r["quality"]) for r in rows if r["steps"] == many_steps]
    few = [(r["entropy"], r["quality"]) for r in rows if r["steps"] == few_steps]
    if not many or not few:
        raise SystemExit(f"{tool}: {report} has no synthetic teacher rows at {many_steps} and {few_steps} steps "
                         f"(see {flags})")
    return many, few


def score_row(chain, arr: np.ndarray, many: Curve, few: Curve) -> dict:
    """Exact scores of the sampled sequences ``arr`` and the share of the teacher gap they close."""
    nll, ent = chain.nll(arr), per_sample_unigram_entropy(arr)
    row = {"true_nll": float(nll.mean()), "true_nll_se": float(nll.std(ddof=1) / math.sqrt(len(nll))),
           "entropy": float(ent.mean()), "off_support_rate": float(chain.off_support(arr).mean())}
    gc = gap_closed(many, few, (row["entropy"], row["true_nll"]))
    row.update({"gap_closed": gc.fraction, "teacher_many_at_entropy": gc.teacher_many_quality,
                "teacher_few_at_entropy": gc.teacher_few_quality, "note": gc.note})
    return row
