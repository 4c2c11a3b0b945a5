#!/usr/bin/env python
"""Text students vs the teacher's own 16-step frontier, with a bootstrap confidence interval.

The demo's text benchmark has no many-vs-few-step gap, so the question there is whether a student at
16 steps beats temperature sampling of its teacher at 16 steps at the same entropy ("vs teacher@n" in
the report, nats/token). With 32 samples per point that figure has a standard error near its size.
This tool adds samples and a denser teacher temperature grid on a finished demo run directory and
bootstraps over samples:

    python experiments/text_frontier_bootstrap/text_frontier_bootstrap.py --run-dir runs/demo --evaluator ar
    python experiments/text_frontier_bootstrap/text_frontier_bootstrap.py --run-dir runs/demo --evaluator smollm2  # ~12 min

Per configuration: the demo's own seed-0 rows when it sampled that configuration (else 32 fresh rows at
seed 0, identical to what the demo would have drawn: sampling is keyed per sample), plus
``--extra-samples`` rows at seed 1. Scores are cached per evaluator in ``--out``. The intervals come
from the report's own bootstrap (mcd_scale/eval/bootstrap.py): every draw resamples every
configuration, rebuilds the teacher curve (entropy, log Gen PPL) and reads it at the student's entropy.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [REPO, os.path.join(REPO, "tools")]
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from mcd_scale.eval.bootstrap import SampleScores, bootstrap_student  # noqa: E402
from mcd_scale.eval.frontier import interpolate_quality_at_entropy  # noqa: E402
from mcd_scale.eval.metrics import per_sample_unigram_entropy  # noqa: E402

SEED0_ROWS = 32  # the demo's text_num_samples


def configs(a) -> list[tuple[str, int, float, str]]:
    out = [("teacher", 0, t, os.path.join(a.run_dir, "text_teacher")) for t in a.teacher_temperatures]
    for obj in ("mcd", "sdtt"):
        out.append((obj, 1, 1.0, os.path.join(a.run_dir, f"text_{obj}", "round_0")))
        out += [(obj, 2, t, os.path.join(a.run_dir, f"text_{obj}", "round_1")) for t in a.student_temperatures]
    return out


def collect_samples(a, out_dir: str) -> dict[tuple, list[dict]]:
    import sample as sample_cli  # tools/sample.py

    tok = os.path.join(a.run_dir, "data", "text", "tokenizer.model")
    groups, loaded = {}, {}
    for model, rnd, temp, ckpt in configs(a):
        key = (model, rnd, temp)
        rows = []
        for seed, n in ((0, SEED0_ROWS), (1, a.extra_samples)):
            demo_file = os.path.join(a.run_dir, "samples", f"text_{model}_r{rnd}_s16_T{temp}.jsonl")
            cache = os.path.join(out_dir, f"text_{model}_r{rnd}_s16_T{temp}_seed{seed}.jsonl")
            if seed == 0 and os.path.exists(demo_file):
                cache = demo_file
            if not os.path.exists(cache):
                if ckpt not in loaded:
                    loaded[ckpt] = sample_cli.load_model(ckpt)
                res = sample_cli.sample(loaded[ckpt], 16, n, seed=seed, temperature=temp, sampler="ancestral",
                                        batch_size=16)
                with open(cache + ".tmp", "w", encoding="utf-8") as fh:
                    for text, ids in zip(sample_cli.decode_rows(res.tokens, tok), res.tokens):
                        fh.write(json.dumps({"text": text, "ids": ids.tolist()}) + "\n")
                os.replace(cache + ".tmp", cache)
                print(f"sampled {model} r{rnd} T{temp} seed {seed}: {n} rows", file=sys.stderr, flush=True)
            with open(cache, encoding="utf-8") as fh:
                rows += [json.loads(line) for line in fh]
        groups[key] = rows
    return groups


def score(a, groups: dict[tuple, list[dict]], out_dir: str) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    path = os.path.join(out_dir, f"scores_{a.evaluator}.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            cached = {tuple(json.loads(k)): v for k, v in json.load(fh).items()}
        if all(k in cached and len(cached[k][0]) == len(v) for k, v in groups.items()):
            return {k: (np.array(cached[k][0]), np.array(cached[k][1])) for k in groups}
    keys = list(groups)
    rows = [r for k in keys for r in groups[k]]
    if a.evaluator == "smollm2":
        from mcd_scale.eval.hf_evaluator import HFEvaluator
        nll, n = HFEvaluator.smollm2().score_texts([r["text"] for r in rows])
    else:
        import torch

        from mcd_scale.eval.ar_evaluator import AREvaluator
        ev = AREvaluator.load(os.path.join(a.run_dir, "ar_evaluator"))
        nll = np.concatenate([ev.score(torch.tensor([r["ids"] for r in rows[i:i + 64]]))
                              for i in range(0, len(rows), 64)])
        n = np.array([len(r["ids"]) for r in rows])
    out, at = {}, 0
    for k in keys:
        m = len(groups[k])
        out[k] = (np.asarray(nll[at:at + m], dtype=float), np.asarray(n[at:at + m], dtype=float))
        at += m
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump({json.dumps(list(k)): [v[0].tolist(), v[1].tolist()] for k, v in out.items()}, fh)
    os.replace(path + ".tmp", path)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/demo", help="a finished demo run directory")
    ap.add_argument("--evaluator", choices=["ar", "smollm2"], default="ar")
    ap.add_argument("--extra-samples", type=int, default=64, help="rows per configuration at seed 1")
    ap.add_argument("--teacher-temperatures", type=float, nargs="+", default=[0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0])
    ap.add_argument("--student-temperatures", type=float, nargs="+", default=[0.8, 0.9, 1.0])
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", default=None, help="default: <run-dir>/text_bootstrap")
    a = ap.parse_args(argv)
    out_dir = a.out or os.path.join(a.run_dir, "text_bootstrap")
    os.makedirs(out_dir, exist_ok=True)
    groups = collect_samples(a, out_dir)
    scores = score(a, groups, out_dir)
    per = {k: SampleScores(scores[k][0], scores[k][1], per_sample_unigram_entropy([r["ids"] for r in v]))
           for k, v in groups.items()}
    teacher_keys = sorted(k for k in groups if k[0] == "teacher")
    curve = [per[k].point(np.arange(len(groups[k]))) for k in teacher_keys]
    result = {"evaluator": a.evaluator, "run_dir": a.run_dir, "bootstrap": a.bootstrap,
              "teacher_16": [{"temperature": k[2], "samples": len(groups[k]), "entropy": e, "gen_ppl": math.exp(q)}
                             for k, (e, q) in zip(teacher_keys, curve)],
              "students": []}
    for k in sorted(k for k in groups if k[0] != "teacher"):
        e, q = per[k].point(np.arange(len(groups[k])))
        read = interpolate_quality_at_entropy(curve, e)
        ci = bootstrap_student(per[k], [], [per[t] for t in teacher_keys], draws=a.bootstrap)
        result["students"].append({
            "model": k[0], "round": k[1], "temperature": k[2], "samples": len(groups[k]), "entropy": e,
            "gen_ppl": math.exp(q), "vs_teacher_16_nats": read.quality - q if read.in_range else math.nan,
            "ci95": ci["gain_vs_few_ci95"], "p_positive": ci["p_gain_positive"],
            "out_of_range_draws": ci["bootstrap_draws_out_of_range"]})
    with open(os.path.join(out_dir, f"bootstrap_{a.evaluator}.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(f"| model | round | T | samples | entropy | Gen PPL ({a.evaluator}) | vs teacher@16 (nats) | 95% CI | P(> 0) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in result["students"]:
        ci = "–" if s["ci95"] is None else f"[{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}]"
        g = s["vs_teacher_16_nats"]
        g = "outside the teacher curve" if math.isnan(g) else f"{g:+.3f}"
        note = f" ({s['out_of_range_draws']} draws outside the curve)" if s["out_of_range_draws"] else ""
        p_pos = "–" if s["p_positive"] is None else f"{s['p_positive']:.3f}"
        print(f"| {s['model']} | {s['round']} | {s['temperature']} | {s['samples']} | {s['entropy']:.3f} | "
              f"{s['gen_ppl']:.1f} | {g} | {ci}{note} | {p_pos} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
