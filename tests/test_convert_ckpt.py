"""tools/convert_ckpt.py: export never deletes what it did not create, verifies what it reads, and
inspect reports integrity; every refusal is one line, exit 2."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from tests import tiny_run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("convert"))
    data = tiny_run.prepare(tmp)
    run_dir = os.path.join(tmp, "run")
    res = tiny_run.train(run_dir, data, "train.steps=2")
    assert res.returncode == 0, res.stderr
    return run_dir


def convert(*args):
    return tiny_run.run(["tools/convert_ckpt.py", *args], timeout=120)


def refused(res, needle):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert needle in res.stderr, res.stderr


def test_export_onto_a_run_is_refused_and_the_run_untouched(base, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(base, run_dir)
    before = tiny_run.tree_digest(run_dir)
    refused(convert("export", run_dir, "--out", run_dir), "not empty")
    refused(convert("export", run_dir, "--out", run_dir, "--force"), "not written by convert_ckpt")
    assert tiny_run.tree_digest(run_dir) == before


def test_force_replaces_only_the_tools_own_files(base, tmp_path):
    out = tmp_path / "export"
    assert convert("export", base, "--out", str(out)).returncode == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["files"]["model.safetensors"]["sha256"] == meta["sha256"]
    (out / "notes.txt").write_text("mine")
    refused(convert("export", base, "--out", str(out)), "--force")
    res = convert("export", base, "--out", str(out), "--force")
    assert res.returncode == 0, res.stderr
    assert (out / "notes.txt").read_text() == "mine"  # not the tool's: kept
    assert sorted(os.listdir(out)) == sorted(["notes.txt", "meta.json", *meta["files"]])


def test_truncated_weights_do_not_export(base, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(base, run_dir)
    weights = os.path.join(run_dir, "checkpoints", "step_000002", "model.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(os.path.getsize(weights) - 100)
    refused(convert("export", run_dir, "--out", str(tmp_path / "out")), "model.safetensors")
    assert not (tmp_path / "out").exists()
    refused(convert("inspect", run_dir), "model.safetensors")


def test_inspect_reports_integrity_and_sample_reads_an_export(base, tmp_path):
    res = convert("inspect", base, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["integrity"] == "ok" and info["train_state"]["step"] == 2
    out = tmp_path / "export"
    assert convert("export", base, "--out", str(out)).returncode == 0
    res = tiny_run.run(["tools/sample.py", "--checkpoint", str(out), "--steps", "2", "--num-samples", "1",
                        "--quiet"], timeout=120)  # no --config: the export carries its resolved config
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout.splitlines()[0])["ids"]) == 32
