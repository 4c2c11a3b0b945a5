"""tools/nelbo.py: a checkpoint's NELBO equals the trainer's own validation NELBO on the same batches, on one
process and on two data-parallel ranks; more time samples give another (keyed, reproducible) estimate."""
from __future__ import annotations

import json
import math
import os


import pytest

from tests import tiny_run
from tests.mp import run_cli_ranks

NELBO = ["tools/nelbo.py", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tiny teacher that validated at step 2 (eval_batches 2, global batch 4), fp32 on CPU."""
    tmp = str(tmp_path_factory.mktemp("nelbo"))
    data = tiny_run.prepare(tmp)
    run = os.path.join(tmp, "run")
    res = tiny_run.train(run, data, "train.steps=2", "train.eval_every=2", "train.eval_batches=2",
                         "train.precision=fp32", "checkpoint.every=0")
    assert res.returncode == 0, res.stderr[-3000:]
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as fh:
        val = [r for r in map(json.loads, fh) if r.get("split") == "val"]
    assert val and val[-1]["step"] == 2, val
    return run, data, val[-1]["nelbo"]


def nelbo_of(argv):
    res = tiny_run.run(NELBO + argv)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_nelbo_tool_equals_the_trainers_validation(trained, tmp_path):
    run, data, logged = trained
    out = nelbo_of(["--checkpoint", run, "--data", data, "--device", "cpu", "--out", str(tmp_path / "n.json")])
    assert out["nelbo"] == pytest.approx(logged, rel=1e-5, abs=1e-6)
    assert out["ppl_bound"] == pytest.approx(math.exp(out["nelbo"]))
    assert out["batches"] == 2 and out["time_samples"] == 1 and out["antithetic"] is True
    assert out["tokens"] == 2 * 4 * 32
    assert json.loads((tmp_path / "n.json").read_text()) == out
    # two data-parallel ranks: the same batches split over ranks, the same figure
    codes, logs = run_cli_ranks(NELBO + ["--checkpoint", run, "--data", data, "--device", "cpu",
                                         "--out", str(tmp_path / "n2.json")], world_size=2, timeout=180)
    assert codes == [0, 0], logs
    two = json.loads((tmp_path / "n2.json").read_text())
    assert two["world_size"] == 2 and two["nelbo"] == pytest.approx(logged, rel=1e-5, abs=1e-6)


def test_more_time_samples_are_another_keyed_estimate(trained):
    run, data, logged = trained
    k2 = nelbo_of(["--checkpoint", run, "--data", data, "--device", "cpu", "--time-samples", "2"])
    again = nelbo_of(["--checkpoint", run, "--data", data, "--device", "cpu", "--time-samples", "2"])
    assert k2["nelbo"] == again["nelbo"]  # deterministic by key
    assert k2["nelbo"] != pytest.approx(logged, rel=1e-6)  # the second pass has its own times and masks
    assert abs(k2["nelbo"] - logged) < 0.5 * logged  # ... of the same bound


def test_bad_input_is_one_line_exit_2(trained, tmp_path):
    run, data, _ = trained
    for argv, needle in ((["--checkpoint", str(tmp_path / "none")], "--checkpoint"),
                         (["--checkpoint", run, "--data", str(tmp_path / "none")], "--data"),
                         (["--checkpoint", run, "--data", data, "--time-samples", "0"], "--time-samples")):
        res = tiny_run.run(NELBO + argv)
        lines = [ln for ln in res.stderr.splitlines() if "error" in ln.lower()]  # (library warnings aside)
        assert res.returncode == 2 and len(lines) == 1 and needle in lines[0], (argv, res.stderr[-2000:])
        assert "Traceback" not in res.stderr


