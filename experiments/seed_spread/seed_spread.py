#!/usr/bin/env python
"""The spread of the demo's synthetic figures over teacher seeds: which figures are stable.

Reads finished demo run directories (``tools/demo.py [--benchmarks synthetic] --teacher-seed N --out DIR``, one
per seed) and prints, per run and as mean / sample standard deviation / range over the runs:

- the synthetic teacher's last validation NELBO (``synthetic_teacher/metrics.jsonl``);
- teacher@N and teacher@n true NLL at each temperature (``report.json``) and their difference (the raw gap);
- every student's last round (default sampler, ``summary.json``) and every model at n steps with the strided
  sampler (``strided/summary.json``): gap closed and the gain over teacher@n (same sampler), with the bootstrap
  95% intervals of each run.

    .venv/bin/python experiments/seed_spread/seed_spread.py runs/demo_seed1 runs/syn_seed2 runs/syn_seed1234 [--json]

A figure missing in some run (e.g. a student outside the teacher curves at T = 1) is averaged over the runs that
have it, and the count is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def _read_json(path: str):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def run_figures(run: str) -> dict:
    """{figure name: (value, ci95 or None)} of one demo run directory."""
    out: dict = {}
    with open(os.path.join(run, "synthetic_teacher", "metrics.jsonl"), encoding="utf-8") as fh:
        vals = [json.loads(line) for line in fh if '"val"' in line]
    if vals:
        out["teacher validation NELBO"] = (vals[-1]["nelbo"], None)
    rows = _read_json(os.path.join(run, "report.json"))
    rows = rows["rows"] if isinstance(rows, dict) else rows
    teacher = {(r["steps"], r["temperature"]): r["quality"] for r in rows
               if r["benchmark"] == "synthetic" and r["model"] == "teacher"}
    many = max(s for s, _ in teacher)
    few = min(s for s, _ in teacher)
    for (steps, temp), q in sorted(teacher.items()):
        out[f"teacher@{steps} NLL, T={temp:g}"] = (q, None)
        if steps == many and (few, temp) in teacher:
            out[f"teacher@{few} - teacher@{many}, T={temp:g}"] = (teacher[(few, temp)] - q, None)
    for sub, label in (("", "default sampler"), ("strided", "strided sampler")):
        path = os.path.join(run, sub, "summary.json")
        if not os.path.exists(path):
            continue
        summary = [s for s in _read_json(path)["summary"] if s["benchmark"] == "synthetic"]
        if sub:
            summary = [s for s in summary if s["sampler"] != "ancestral"]
        last = {}
        for s in summary:
            last[s["model"]] = max(last.get(s["model"], 0), s["round"])
        for s in summary:
            if s["round"] != last[s["model"]]:
                continue
            name = f"{s['model']} r{s['round']} ({label}), T={s['temperature']:g}"
            if s.get("gap_closed") is not None:
                out[f"{name}: gap closed"] = (s["gap_closed"], s.get("gap_closed_ci95"))
            if s.get("gain_vs_same_sampler_nats") is not None:
                out[f"{name}: vs teacher@n same sampler"] = (s["gain_vs_same_sampler_nats"],
                                                             s.get("gain_vs_same_sampler_ci95"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="finished demo run directories, one per teacher seed")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = ap.parse_args()
    per_run = {}
    for run in args.runs:
        try:
            per_run[run] = run_figures(run)
        except (OSError, ValueError, KeyError) as exc:
            print(f"seed_spread: error: {run}: {exc} (a finished tools/demo.py run directory?)", file=sys.stderr)
            return 2
    names = list(dict.fromkeys(n for figs in per_run.values() for n in figs))
    table = []
    for name in names:
        vals = [per_run[r][name][0] for r in args.runs if name in per_run[r]]
        cis = [per_run[r][name][1] for r in args.runs if name in per_run[r]]
        table.append({"figure": name, "values": [per_run[r].get(name, (None, None))[0] for r in args.runs],
                      "ci95": cis, "n": len(vals), "mean": statistics.fmean(vals),
                      "sd": statistics.stdev(vals) if len(vals) > 1 else None,
                      "min": min(vals), "max": max(vals)})
    if args.json:
        print(json.dumps({"runs": args.runs, "figures": table}, indent=1))
        return 0

    def fmt(v):
        return "–" if v is None else f"{v:+.3f}" if abs(v) < 1 else f"{v:.3f}"

    print("| figure | " + " | ".join(os.path.basename(os.path.normpath(r)) for r in args.runs) + " | mean | sd | n |")
    print("|---|" + "---|" * (len(args.runs) + 3))
    for row in table:
        cells = []
        for v, r in zip(row["values"], args.runs):
            ci = per_run[r].get(row["figure"], (None, None))[1]
            cells.append(fmt(v) + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""))
        print(f"| {row['figure']} | " + " | ".join(cells) + f" | {fmt(row['mean'])} | {fmt(row['sd'])} | {row['n']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
