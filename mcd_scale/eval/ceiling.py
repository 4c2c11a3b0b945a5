"""The honest-ceiling table: teacher curves, students, the oracle ideal and the honest ceiling
(``mcd-ceiling``, mcd_scale/eval/ideal_student.py) on the synthetic benchmark, each with a bootstrap
interval, plus the two checks docs/ceiling.md rests on: a ceiling at K against 2K draws (paired over
sample index), and each student's share of each ideal's gap closed.

Input: samples JSONL rows (tools/ideal_rows.py and student sampling; ``ids`` in sample-index order per
configuration). A configuration is (model, round, steps, temperature, draws): two ceilings at different K
are two rows. Quality is the exact true NLL per token (the chain), entropy the per-sample unigram entropy.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np

from mcd_scale.eval.bootstrap import SampleScores, bootstrap_difference, bootstrap_share, bootstrap_student
from mcd_scale.eval.frontier import gap_closed
from mcd_scale.eval.metrics import per_sample_unigram_entropy

Key = tuple  # (model, round, steps, temperature, draws)


def group_scores(rows: Iterable[Mapping], chain) -> dict[Key, SampleScores]:
    """Per-sample scores of every configuration, in file order (= sample index order)."""
    ids: dict[Key, list] = defaultdict(list)
    for r in rows:
        if r.get("benchmark", "synthetic") != "synthetic":
            continue
        ids[(r["model"], int(r.get("round", 0)), int(r["steps"]), float(r["temperature"]),
             r.get("draws"))].append(r["ids"])
    out = {}
    for key, seqs in ids.items():
        arr = np.asarray(seqs, dtype=np.int64)
        out[key] = SampleScores(chain.nll(arr), np.full(len(arr), float(arr.shape[1])),
                                per_sample_unigram_entropy(arr))
    return out


def common_prefix(scores: Mapping[Key, SampleScores]) -> dict[Key, SampleScores]:
    """Every configuration cut to the smallest sample count. Sample i's noise is keyed by its index whatever
    the count (mcd_scale/rng.py), so the first n samples of every configuration share noise index by index and
    the bootstrap can pair them (at the cost of the longer configurations' extra samples)."""
    n = min(len(v) for v in scores.values())
    return {k: SampleScores(v.nll[:n], v.tokens[:n], v.entropy[:n]) for k, v in scores.items()}


def _label(key: Key) -> str:
    model, rnd, steps, temp, draws = key
    return f"{model}{f' r{rnd}' if rnd else ''} @{steps} T {temp:g}" + (f" K {draws}" if draws else "")


def ceiling_table(scores: Mapping[Key, SampleScores], many_steps: int, few_steps: int, draws: int = 1000) -> dict:
    """Every non-teacher configuration at ``few_steps`` read against the teacher curves (gap closed and vs
    teacher@n with paired bootstrap intervals), the ceiling's K-vs-2K differences and the students' shares."""
    teacher = {k: v for k, v in scores.items() if k[0] == "teacher"}
    many = sorted((k for k in teacher if k[2] == many_steps), key=lambda k: k[3])
    few = sorted((k for k in teacher if k[2] == few_steps), key=lambda k: k[3])
    if not many or not few:
        raise ValueError(f"need teacher rows at {many_steps} and {few_steps} steps; have steps "
                         f"{sorted({k[2] for k in teacher})}")
    pts = lambda keys: [scores[k].point(np.arange(len(scores[k]))) for k in keys]  # noqa: E731
    rows = []
    others = sorted((k for k in scores if k[0] != "teacher" and k[2] == few_steps), key=lambda k: (k[0], k[1], k[3],
                                                                                                   k[4] or 0))
    for key in others:
        e, q = scores[key].point(np.arange(len(scores[key])))
        g = gap_closed(pts(many), pts(few), (e, q))
        ci = bootstrap_student(scores[key], [scores[k] for k in many], [scores[k] for k in few], draws=draws)
        if not math.isfinite(g.fraction):    # no interval for a figure undefined at the point estimate
            ci["gap_closed_ci95"] = None
        if not math.isfinite(g.teacher_few_quality):
            ci["gain_vs_few_ci95"] = None
        rows.append({"config": _label(key), "key": list(key), "samples": len(scores[key]), "entropy": e,
                     "true_nll": q, "gap_closed": g.fraction, "gain_vs_few_nats": g.teacher_few_quality - q,
                     "note": g.note, **ci})
    # teacher@N itself against teacher@n: the size of the gap, with its interval (gap closed is 1 by definition)
    for key in many:
        e, q = scores[key].point(np.arange(len(scores[key])))
        g = gap_closed(pts(many), pts(few), (e, q))
        ci = bootstrap_student(scores[key], [], [scores[k] for k in few], draws=draws)
        if not math.isfinite(g.teacher_few_quality):
            ci["gain_vs_few_ci95"] = None
        rows.append({"config": _label(key), "key": list(key), "samples": len(scores[key]), "entropy": e,
                     "true_nll": q, "gap_closed": math.nan, "gain_vs_few_nats": g.teacher_few_quality - q,
                     "note": g.note, **ci})
    curves = {f"teacher@{k[2]} T {k[3]:g}": dict(zip(("entropy", "true_nll"), pts([k])[0])) for k in sorted(teacher)}
    # K against 2K: same model, steps, temperature, paired over sample index
    k_checks = []
    for key in others:
        twice = (key[0], key[1], key[2], key[3], (key[4] or 0) * 2)
        if key[4] and twice in scores:
            d = bootstrap_difference(scores[twice], scores[key], draws=draws)
            e2, q2 = scores[twice].point(np.arange(len(scores[twice])))
            e1, q1 = scores[key].point(np.arange(len(scores[key])))
            k_checks.append({"config": _label(key), "vs": _label(twice), "quality_diff": q2 - q1,
                             "entropy_diff": e2 - e1, **d})
    shares = []
    for s in (k for k in others if k[0] in ("mcd", "sdtt", "mcd-multidraw")):
        for i in (k for k in others if k[0] in ("mcd-ideal", "mcd-ceiling", "sdtt-ideal")):
            if not i[0].startswith(s[0].split("-")[0]):
                continue
            b = bootstrap_share(scores[s], scores[i], [scores[k] for k in many], [scores[k] for k in few], draws=draws)
            shares.append({"student": _label(s), "ideal": _label(i), **b})
    return {"many_steps": many_steps, "few_steps": few_steps, "curves": curves, "rows": rows,
            "k_doubling": k_checks, "shares": shares}


def _iv(ci: Sequence[float] | None) -> str:
    return "–" if not ci else f"[{ci[0]:.3g}, {ci[1]:.3g}]"


def _f(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def render(table: Mapping) -> str:
    n, N = table["few_steps"], table["many_steps"]
    out = [f"teacher curves (true NLL nats/token, entropy): " +
           "; ".join(f"{k} {v['true_nll']:.3f} / {v['entropy']:.3f}" for k, v in table["curves"].items()), "",
           f"| configuration | samples | entropy | true NLL | gap closed (teacher@{n} -> @{N}) | vs teacher@{n} (nats) "
           "| bootstrap | draws outside a curve / without gap |", "|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        out.append(f"| {r['config']} | {r['samples']} | {r['entropy']:.3f} | {r['true_nll']:.3f} | "
                   f"{_f(r['gap_closed'])} {_iv(r['gap_closed_ci95'])} | {_f(r['gain_vs_few_nats'])} "
                   f"{_iv(r['gain_vs_few_ci95'])} | {'paired' if r['paired'] else 'unpaired'} | "
                   f"{r['draws_outside_few_curve'] + r['draws_outside_many_curve']} / {r['draws_without_gap']} |")
    if table["k_doubling"]:
        out += ["", "| K check | 2K − K true NLL | interval | 2K − K entropy | interval |", "|---|---|---|---|---|"]
        for c in table["k_doubling"]:
            out.append(f"| {c['config']} vs {c['vs']} | {c['quality_diff']:+.3f} | {_iv(c['quality_diff_ci95'])} | "
                       f"{c['entropy_diff']:+.3f} | {_iv(c['entropy_diff_ci95'])} |")
    if table["shares"]:
        out += ["", "| student | ideal | share of the ideal's gap closed (95%) | draws undefined |", "|---|---|---|---|"]
        for s in table["shares"]:
            out.append(f"| {s['student']} | {s['ideal']} | {_iv(s['share_ci95'])} | {s['draws_undefined']} |")
    return "\n".join(out) + "\n"


def write_table(sample_files: Sequence[str], chain_path: str, out_prefix: str, many_steps: int, few_steps: int,
                draws: int = 1000, pair_prefix: bool = False) -> dict:
    # lazy: loads torch; importing this module does not need it
    from mcd_scale.eval.synthetic import load_source
    chain = load_source(chain_path)
    rows = []
    for path in sample_files:
        with open(path, encoding="utf-8") as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    scores = group_scores(rows, chain)
    table = ceiling_table(common_prefix(scores) if pair_prefix else scores, many_steps, few_steps, draws)
    with open(out_prefix + ".json", "w", encoding="utf-8") as fh:
        json.dump(table, fh, indent=1, default=lambda v: None)
    with open(out_prefix + ".md", "w", encoding="utf-8") as fh:
        fh.write(render(table))
    return table
