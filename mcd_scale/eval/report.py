"""Evaluation report: rows -> report.json, report.md (table + matched-entropy summary), PNG plots.

A row is one (benchmark, model, round, steps, temperature[, sampler]) sampling configuration, with
``quality`` lower-is-better (true NLL in nats/token on the synthetic benchmark, Gen PPL on text). The
summary compares each student with the teacher at equal entropy (:func:`gap_closed`): teacher@N is the
teacher's largest step count, teacher@n its rows at the student's own step count. Curves are read in
nats per token (Gen PPL through its log), so "gap closed" and "vs teacher@n" mean the same on both
benchmarks.

``sampler`` is optional: a row without it was drawn by the default sampler (``ancestral``), which is what
the issue's report schema means, so a report of default-sampler rows keeps exactly :data:`ROW_KEYS`. Rows
of another sampler (e.g. the coupled sampler's strided reveal order) carry the key; the summary then
measures the student's gap closed against the default-sampler teacher curves (the gap the benchmark is
about) and, in ``gain_vs_same_sampler_nats``, against the teacher sampled the same way at the same steps
(what distillation adds to the sampler).
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any, Mapping, Optional, Sequence

from mcd_scale.eval.bootstrap import MAX_DROPPED_SHARE, SampleScores, bootstrap_student
from mcd_scale.eval.frontier import FrontierPoint, gap_closed, interpolate_quality_at_entropy
from mcd_scale.eval.metrics import speedup

ROW_KEYS = ("benchmark", "model", "round", "steps", "temperature", "quality", "quality_metric", "entropy", "nfe",
            "seconds_per_sample", "evaluator")
BENCHMARKS = {"synthetic": "true_nll", "text": "gen_ppl"}
# Beside the headline quality when both were asked for: the Gen PPL of MDLM/SDTT/DUO's convention
# (mcd_scale/eval/gen_ppl.py, tools/evaluate.py --gen-ppl) and its evaluator, so a paper's table reads next to ours.
OPTIONAL_ROW_KEYS = ("gen_ppl_mdlm", "gen_ppl_evaluator")
# The ideal students (mcd_scale/eval/ideal_student.py, tools/ideal_rows.py): each loss's population optimum,
# sampled like a student, so a trained student is read against its own ceiling as well as the teacher.
# "mcd-ceiling" is the honest ceiling (docs/ceiling.md): the reverse-KL optimum with the teacher's own
# continuations as data, no oracle draws.
MODELS = ("teacher", "mcd", "sdtt", "mcd-ideal", "mcd-ideal-fkl", "sdtt-ideal", "mcd-ceiling")
DEFAULT_SAMPLER = "ancestral"
# "coupled": the deterministic coupled sampler, random reveal order; "coupled-strided": its strided order.
SAMPLERS = (DEFAULT_SAMPLER, "coupled", "coupled-strided")

Row = Mapping[str, Any]


def validate_row(row: Row, where: str = "row") -> dict:
    """The row as a dict with exactly ROW_KEYS; a clear error naming the field otherwise."""
    keys = set(row) - {"sampler", *OPTIONAL_ROW_KEYS}
    if keys != set(ROW_KEYS):
        raise ValueError(f"{where}: fields {sorted(keys)} differ from {list(ROW_KEYS)} (+ optional 'sampler') "
                         f"(missing {sorted(set(ROW_KEYS) - keys)}, unknown {sorted(keys - set(ROW_KEYS))})")
    if "sampler" in row and row["sampler"] not in SAMPLERS:
        raise ValueError(f"{where}: sampler {row['sampler']!r} is not one of {list(SAMPLERS)}")
    if row["benchmark"] not in BENCHMARKS:
        raise ValueError(f"{where}: benchmark {row['benchmark']!r} is not one of {sorted(BENCHMARKS)}")
    if row["model"] not in MODELS:
        raise ValueError(f"{where}: model {row['model']!r} is not one of {list(MODELS)}")
    if row["quality_metric"] != BENCHMARKS[row["benchmark"]]:
        raise ValueError(f"{where}: quality_metric of the {row['benchmark']} benchmark must be "
                         f"{BENCHMARKS[row['benchmark']]!r}, got {row['quality_metric']!r}")
    for k in ("quality", "entropy", "temperature"):
        if not isinstance(row[k], (int, float)) or not math.isfinite(row[k]):
            raise ValueError(f"{where}: {k} must be a finite number, got {row[k]!r}")
    out = {k: row[k] for k in ROW_KEYS}
    for k in OPTIONAL_ROW_KEYS:
        if row.get(k) is not None:
            out[k] = row[k]
    if sampler_of(row) != DEFAULT_SAMPLER:
        out["sampler"] = row["sampler"]
    return out


def sampler_of(row: Mapping[str, Any]) -> str:
    return row.get("sampler") or DEFAULT_SAMPLER


def config_key(row: Mapping[str, Any]) -> tuple:
    """(benchmark, model, round, steps, temperature), + sampler when it is not the default one: one
    sampling configuration = one report row."""
    key = (row["benchmark"], row["model"], int(row["round"]), int(row["steps"]), float(row["temperature"]))
    return key if sampler_of(row) == DEFAULT_SAMPLER else key + (sampler_of(row),)


def summarize(rows: Sequence[Row], per_sample: Optional[Mapping[tuple, SampleScores]] = None,
              bootstrap_draws: int = 1000) -> list[dict]:
    """One entry per student row: gap closed at matched entropy and speed-up vs teacher@N.

    per_sample: per-sample scores keyed by :func:`config_key`; when every configuration a student is
    compared with has them, its entry also gets bootstrap 95% intervals (mcd_scale/eval/bootstrap.py).
    """
    out = []
    by_bench: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_bench[r["benchmark"]].append(r)
    for bench, bench_rows in sorted(by_bench.items()):
        all_teacher = [r for r in bench_rows if r["model"] == "teacher"]
        # The gap is the default sampler's: teacher@N and teacher@n as the benchmark defines them.
        teacher = [r for r in all_teacher if sampler_of(r) == DEFAULT_SAMPLER]
        if not teacher:
            continue
        many_steps = max(r["steps"] for r in teacher)
        many = [r for r in teacher if r["steps"] == many_steps]
        # Curves are read in nats: Gen PPL = exp(NLL under the evaluator) rises steeply (convexly) with
        # entropy, so a straight line between two of its points overstates the teacher between them and
        # flatters a student that sits there; interpolating log Gen PPL is the same rule as for true NLL.
        nats = _to_nats(bench_rows)
        many_pts = [FrontierPoint(r["entropy"], nats(r["quality"])) for r in many]
        ref_sec = _mean([r["seconds_per_sample"] for r in many])
        ref_nfe = _mean([r["nfe"] for r in many])
        # Every student, and the teacher drawn by another sampler: how much of the gap the sampler alone closes.
        compared = [r for r in bench_rows if r["model"] != "teacher" or sampler_of(r) != DEFAULT_SAMPLER]
        for s in sorted(compared, key=lambda r: (MODELS.index(r["model"]), r["round"], r["steps"], sampler_of(r),
                                                 r["temperature"])):
            few = [r for r in teacher if r["steps"] == s["steps"]]
            few_pts = [FrontierPoint(r["entropy"], nats(r["quality"])) for r in few]
            frac, note, gain = math.nan, f"no teacher rows at {s['steps']} steps", math.nan
            q_many = q_few = math.nan
            if few_pts:
                g = gap_closed(many_pts, few_pts, FrontierPoint(s["entropy"], nats(s["quality"])))
                frac, note = g.fraction, g.note
                # "vs teacher@n": defined even where gap closed is not (no many-vs-few gap, as on a weak
                # text teacher); positive = the student beats temperature sampling of its teacher.
                gain = g.teacher_few_quality - g.student_quality
                q_many, q_few = nats.inverse(g.teacher_many_quality), nats.inverse(g.teacher_few_quality)
            # "vs teacher@n, same sampler": the student against its teacher drawn by the student's own
            # sampler at the same steps, so a sampler's gain is not credited to distillation.
            same = few
            if sampler_of(s) != DEFAULT_SAMPLER:
                same = ([r for r in all_teacher if r["steps"] == s["steps"] and sampler_of(r) == sampler_of(s)]
                        if s["model"] != "teacher" else [])
            gain_same = math.nan
            if same:
                at = interpolate_quality_at_entropy([FrontierPoint(r["entropy"], nats(r["quality"])) for r in same],
                                                    s["entropy"])
                gain_same = at.quality - nats(s["quality"])
            # A student read between two teacher temperatures is read on a chord of a convex curve, which
            # flatters it (docs/evaluation.md): name every missing temperature.
            missing = [f"teacher@{n} has no T = {s['temperature']:g} point (read on a chord)"
                       for n, curve in ((many_steps, many), (s["steps"], few))
                       if curve and not any(abs(r["temperature"] - s["temperature"]) < 1e-9 for r in curve)]
            if missing and s["model"] != "teacher":
                note = "; ".join(([note] if note else []) + missing)
            ci = {"gain_vs_few_ci95": None, "gap_closed_ci95": None, "p_gain_positive": None,
                  "gain_vs_same_sampler_ci95": None, "paired": None, "gain_draws_used": None,
                  "gap_draws_used": None, "draws_outside_few_curve": None, "draws_outside_many_curve": None,
                  "draws_without_gap": None}
            if (per_sample and few and bootstrap_draws > 0
                    and all(config_key(r) in per_sample for r in [s] + many + few)):
                ci.update(bootstrap_student(per_sample[config_key(s)], [per_sample[config_key(r)] for r in many],
                                            [per_sample[config_key(r)] for r in few], draws=bootstrap_draws))
                # An interval only for a figure defined at the point estimate: where the curves miss the
                # student or there is no gap, percentiles over the few draws where one appears would read
                # as a measurement of something the data does not define.
                if not math.isfinite(frac):
                    ci["gap_closed_ci95"] = ci["gap_draws_used"] = None
                if not math.isfinite(gain):
                    ci["gain_vs_few_ci95"] = ci["p_gain_positive"] = ci["gain_draws_used"] = None
                ci["gain_vs_same_sampler_ci95"] = ci["gain_vs_few_ci95"]
                if same is not few:
                    ci["gain_vs_same_sampler_ci95"] = None
                    if (same and math.isfinite(gain_same)
                            and all(config_key(r) in per_sample for r in same)):
                        ci["gain_vs_same_sampler_ci95"] = bootstrap_student(
                            per_sample[config_key(s)], [], [per_sample[config_key(r)] for r in same],
                            draws=bootstrap_draws)["gain_vs_few_ci95"]
            out.append({"benchmark": bench, "model": s["model"], "round": s["round"], "steps": s["steps"],
                        "sampler": sampler_of(s),
                        "temperature": s["temperature"], "entropy": s["entropy"], "quality": s["quality"],
                        "teacher_steps": many_steps, "teacher_many_quality": q_many, "teacher_few_quality": q_few,
                        "gap_closed": frac, "gain_vs_few_nats": gain, "gain_vs_same_sampler_nats": gain_same,
                        "note": note,
                        "speedup_seconds": speedup(ref_sec, s["seconds_per_sample"]),
                        "speedup_nfe": speedup(ref_nfe, s["nfe"]), **ci})
    return out


class _to_nats:
    """quality -> nats per token: identity for true NLL, log for Gen PPL (one metric per benchmark)."""

    def __init__(self, rows: Sequence[Row]):
        metrics = {r["quality_metric"] for r in rows}
        if len(metrics) != 1:
            raise ValueError(f"benchmark '{rows[0]['benchmark']}' mixes quality metrics {sorted(metrics)}")
        self.log = metrics.pop() == "gen_ppl"

    def __call__(self, q: float) -> float:
        return math.log(q) if self.log else q

    def inverse(self, v: float) -> float:
        return math.exp(v) if self.log and math.isfinite(v) else v


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def render_markdown(rows: Sequence[Row], summary: Sequence[Mapping[str, Any]],
                    reference: Optional[Mapping[str, Mapping[str, Any]]]) -> str:
    lines = ["# Evaluation report", "",
             "Quality is lower-is-better: true NLL (nats/token) on the synthetic benchmark, Gen PPL on text. "
             "Entropy is the mean per-sample unigram entropy (nats). Compare models at equal entropy.", ""]
    for bench in sorted({r["benchmark"] for r in rows}):
        lines += [f"## {bench}", ""]
        ref = (reference or {}).get(bench)
        if ref:
            lines += [f"Reference (real held-out data, {ref.get('evaluator', '?')}): quality "
                      f"{_fmt(ref.get('quality'))} ({ref.get('quality_metric', BENCHMARKS[bench])}), entropy "
                      f"{_fmt(ref.get('entropy'))}" + (f"; {ref['note']}" if ref.get("note") else ""), ""]
        bench_rows = [r for r in rows if r["benchmark"] == bench]
        cols = list(ROW_KEYS[1:])
        if any(sampler_of(r) != DEFAULT_SAMPLER for r in bench_rows):
            cols.insert(cols.index("steps") + 1, "sampler")
        cols += [k for k in OPTIONAL_ROW_KEYS if any(r.get(k) is not None for r in bench_rows)]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in sorted(bench_rows, key=lambda r: (MODELS.index(r["model"]), r["round"], -r["steps"],
                                                   SAMPLERS.index(sampler_of(r)), r["temperature"])):
            lines.append("| " + " | ".join(_fmt(sampler_of(r) if k == "sampler" else r.get(k)) for k in cols) + " |")
        lines.append("")
        lines += render_summary_table([s for s in summary if s["benchmark"] == bench])
    return "\n".join(lines)


def render_summary_table(summ: Sequence[Mapping[str, Any]]) -> list[str]:
    """The matched-entropy summary of one benchmark as Markdown lines (empty without students)."""
    if not summ:
        return []
    samplers = any(s.get("sampler", DEFAULT_SAMPLER) != DEFAULT_SAMPLER for s in summ)
    head = ["Matched-entropy summary (teacher curves interpolated at each student's entropy; "
            "gap closed = (teacher@n − student) / (teacher@n − teacher@N) and vs teacher@n = teacher@n − student, "
            "both in nats/token (log Gen PPL on text; curves interpolated in that unit); [brackets]: bootstrap "
            "95% interval over samples when per-sample scores are available, paired over sample index when every "
            "configuration has the same sample count (shared keyed noise); an interval marked * rests on fewer "
            f"than {1 - MAX_DROPPED_SHARE:.0%} of the bootstrap draws (the others put the student outside a "
            "teacher curve or showed no gap; their count is in the note))" +
            (f"; teacher@N and teacher@n are drawn by the {DEFAULT_SAMPLER} sampler, so gap closed is always "
             "against the same gap; 'same sampler' compares a student with its teacher drawn by the "
             "student's own sampler at the same steps (a teacher row of another sampler is that sampler "
             "alone):" if samplers else ":"), ""]
    cols = ["model", "round", "steps", "temperature", "entropy", "quality", "teacher_many_quality",
            "teacher_steps", "teacher_few_quality", "gap_closed", "gain_vs_few_nats", "speedup_seconds",
            "speedup_nfe", "note"]
    names = ["model", "round", "steps", "T", "entropy", "student", "teacher@N", "N", "teacher@n", "gap closed",
             "vs teacher@n (nats)", "speed-up s/sample", "speed-up NFE", "note"]
    if samplers:
        cols.insert(3, "sampler")
        names.insert(3, "sampler")
        at = cols.index("gain_vs_few_nats") + 1
        cols.insert(at, "gain_vs_same_sampler_nats")
        names.insert(at, "vs teacher@n same sampler")
    lines = head + ["| " + " | ".join(names) + " |", "|" + "---|" * len(cols)]
    for s in summ:
        cells = {k: _fmt(s.get(k, DEFAULT_SAMPLER if k == "sampler" else None)) for k in cols}
        for k, ci, used in (("gap_closed", "gap_closed_ci95", "gap_draws_used"),
                            ("gain_vs_few_nats", "gain_vs_few_ci95", "gain_draws_used"),
                            ("gain_vs_same_sampler_nats", "gain_vs_same_sampler_ci95", None)):
            if k in cells and s.get(ci):
                cells[k] += f" [{s[ci][0]:.3g}, {s[ci][1]:.3g}]"
                if used and s.get(used) is not None and s[used] < 1 - MAX_DROPPED_SHARE:
                    cells[k] += "*"
                if k == "gap_closed" and s.get("paired") is False:
                    cells[k] += " (unpaired)"
        dropped = [f"{s[c]} of {s.get('bootstrap_draws')} draws {what}" for c, what in
                   (("draws_outside_few_curve", "outside teacher@n's curve"),
                    ("draws_outside_many_curve", "outside teacher@N's curve"),
                    ("draws_without_gap", "without a gap")) if s.get(c)]
        if dropped:
            cells["note"] = "; ".join(x for x in [cells["note"] if cells["note"] != "–" else "", *dropped] if x)
        lines.append("| " + " | ".join(cells[k] for k in cols) + " |")
    return lines + [""]


def plot_report(rows: Sequence[Row], run_dir: str, reference: Optional[Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """frontier_<benchmark>.png (quality vs entropy per model/round/steps) and steps_<benchmark>.png."""
    # lazy: loads matplotlib; importing this module does not need it
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for bench in sorted({r["benchmark"] for r in rows}):
        bench_rows = [r for r in rows if r["benchmark"] == bench]
        metric = BENCHMARKS[bench]
        series: dict[tuple, list[Row]] = defaultdict(list)
        for r in bench_rows:
            series[(r["model"], r["round"], r["steps"], SAMPLERS.index(sampler_of(r)))].append(r)
        fig, ax = plt.subplots(figsize=(7, 5))
        for (model, rnd, steps, smp), pts in sorted(series.items(),
                                                    key=lambda kv: (MODELS.index(kv[0][0]), kv[0][1:])):
            pts = sorted(pts, key=lambda r: r["entropy"])
            tag = "" if SAMPLERS[smp] == DEFAULT_SAMPLER else f" {SAMPLERS[smp]}"
            ax.plot([p["entropy"] for p in pts], [p["quality"] for p in pts], marker="o" if not tag else "s",
                    linestyle="--" if model == "teacher" else "-", label=f"{model} r{rnd} @{steps}{tag}")
        ref = (reference or {}).get(bench)
        if ref and ref.get("entropy") is not None:
            ax.plot([ref["entropy"]], [ref["quality"]], marker="*", markersize=14, color="k", linestyle="",
                    label="real held-out data")
        ax.set_xlabel("mean unigram entropy (nats)")
        ax.set_ylabel(metric + " (lower is better)")
        if metric == "gen_ppl":
            ax.set_yscale("log")
        ax.set_title(f"{bench}: quality–entropy frontiers")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(run_dir, f"frontier_{bench}.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(7, 5))
        by_model: dict[tuple, dict[int, Row]] = defaultdict(dict)
        for r in bench_rows:  # per steps, the row whose temperature is closest to 1
            key = (r["model"], r["round"], SAMPLERS.index(sampler_of(r)))
            cur = by_model[key].get(r["steps"])
            if cur is None or abs(r["temperature"] - 1) < abs(cur["temperature"] - 1):
                by_model[key][r["steps"]] = r
        for (model, rnd, smp), d in sorted(by_model.items(), key=lambda kv: (MODELS.index(kv[0][0]), kv[0][1:])):
            steps = sorted(d)
            tag = "" if SAMPLERS[smp] == DEFAULT_SAMPLER else f" {SAMPLERS[smp]}"
            ax.plot(steps, [d[s]["quality"] for s in steps], marker="o", label=f"{model} round {rnd}{tag}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(metric + " at T closest to 1")
        if metric == "gen_ppl":
            ax.set_yscale("log")
        ax.set_title(f"{bench}: quality vs steps")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(run_dir, f"steps_{bench}.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _json_safe(obj: Any) -> Any:
    """NaN -> None (strict JSON has no NaN; a missing comparison is null, not a number)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_report(rows: Sequence[Row], run_dir: str,
                 reference: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 per_sample: Optional[Mapping[tuple, SampleScores]] = None) -> dict:
    """Write report.json (the rows), report.md, summary.json (reference + summary) and the plots into ``run_dir``; returns what was written.

    reference: per benchmark, the evaluator's score of real held-out data, e.g.
    ``{"text": {"quality": 45.1, "quality_metric": "gen_ppl", "entropy": 4.3, "evaluator": "ar:..."}}``.
    """
    clean = [validate_row(r, f"row {i}") for i, r in enumerate(rows)]
    if not clean:
        raise ValueError("no rows to report")
    os.makedirs(run_dir, exist_ok=True)
    summary = summarize(clean, per_sample)
    with open(os.path.join(run_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(clean, f, indent=2)
    with open(os.path.join(run_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(render_markdown(clean, summary, reference))
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(_json_safe({"reference": reference or {}, "summary": summary}), f, indent=2)
    plots = plot_report(clean, run_dir, reference)
    return {"summary": summary, "plots": plots, "report_json": os.path.join(run_dir, "report.json"),
            "report_md": os.path.join(run_dir, "report.md")}
