"""Every entry point x a bad input: exit 2, one line naming the file or field, no traceback, and no file
of an existing run changed (the run directory is hashed before and after). Single-process launches;
the multi-rank "on every rank" case is test_checkpoint_integrity's resume (one rank) plus the rank
prefix of mcd_scale/cli.py."""
from __future__ import annotations

import os
import shutil

import pytest

from tests import tiny_run


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("entry"))
    data = tiny_run.prepare(tmp)
    run_dir = os.path.join(tmp, "run")
    res = tiny_run.train(run_dir, data, "train.steps=2")
    assert res.returncode == 0, res.stderr
    bad_tok = os.path.join(tmp, "bad_tokenizer.model")
    with open(bad_tok, "wb") as fh:
        fh.write(b"not a sentencepiece model")
    trunc = os.path.join(tmp, "trunc_run")  # a copy whose consolidated weights lost their tail
    shutil.copytree(run_dir, trunc)
    weights = os.path.join(trunc, "checkpoints", "step_000002", "model.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(os.path.getsize(weights) // 2)
    return {"data": data, "run": run_dir, "tmp": tmp, "bad_tok": bad_tok, "trunc": trunc,
            "missing": os.path.join(tmp, "does_not_exist")}


T = tiny_run.train_argv
CASES = {
    # name: (argv builder, text the one line must contain)
    "train/missing-data": (lambda e: T(e["run"], e["missing"], "train.steps=3"), "data.path"),
    "train/missing-step": (lambda e: T(e["run"], e["data"], "train.steps=3", "checkpoint.load=15"),
                           "checkpoint.load"),
    "train/bad-field": (lambda e: T(e["run"], e["data"], "model.hiddn=3"), "hiddn"),
    "train/truncated-weights": (lambda e: T(e["trunc"], e["data"], "train.steps=3"), "model.safetensors"),
    "convert/missing": (lambda e: ["tools/convert_ckpt.py", "inspect", e["missing"]], "does_not_exist"),
    "convert/export-onto-run": (lambda e: ["tools/convert_ckpt.py", "export", e["run"], "--out", e["run"]],
                                "not empty"),
    "convert/truncated": (lambda e: ["tools/convert_ckpt.py", "export", e["trunc"], "--out",
                                     os.path.join(e["tmp"], "x")], "model.safetensors"),
    "sample/missing": (lambda e: ["tools/sample.py", "--checkpoint", e["missing"], "--steps", "2"], "does_not_exist"),
    "sample/truncated": (lambda e: ["tools/sample.py", "--checkpoint", e["trunc"], "--steps", "2"],
                         "model.safetensors"),
    "sample/bad-tokenizer": (lambda e: ["tools/sample.py", "--checkpoint", e["run"], "--steps", "2",
                                        "--tokenizer", e["bad_tok"]], "bad_tokenizer.model"),
    "sample/bad-steps": (lambda e: ["tools/sample.py", "--checkpoint", e["run"], "--steps", "0"], "--steps"),
    "precompute/truncated-teacher": (lambda e: ["tools/precompute_trajectories.py", "--teacher", e["trunc"],
                                                "--data", e["data"], "--out", os.path.join(e["tmp"], "traj")],
                                     "model.safetensors"),
    "distill_rounds/missing-teacher": (lambda e: ["tools/distill_rounds.py", "--teacher", e["missing"], "--config",
                                                  "configs/tiny/distill.yaml", "--run-dir",
                                                  os.path.join(e["tmp"], "rounds")], "does_not_exist"),
    "evaluate/missing-samples": (lambda e: ["tools/evaluate.py", "--samples", e["missing"], "--run-dir",
                                            os.path.join(e["tmp"], "eval")], "does_not_exist"),
    "prepare_data/missing-input": (lambda e: ["tools/prepare_data.py", e["missing"], "--out",
                                              os.path.join(e["tmp"], "prep2"), "--no-progress"], "does_not_exist"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2(env, case):
    build, needle = CASES[case]
    before = {k: tiny_run.tree_digest(env[k]) for k in ("run", "trunc", "data")}
    res = tiny_run.run(build(env), timeout=180)
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln.lower()]
    assert res.returncode == 2, f"{case}: rc {res.returncode}\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(errors) == 1 and needle in errors[0], res.stderr[-3000:]
    assert {k: tiny_run.tree_digest(env[k]) for k in before} == before  # no file of an existing run changed


def test_debug_switch_shows_the_traceback(env):
    res = tiny_run.run(CASES["convert/missing"][0](env), env={"MCD_DEBUG": "1"})
    assert res.returncode != 0 and "Traceback" in res.stderr
