"""Checkpoint integrity records: COMPLETE lists every file's size and sha256; resume verifies them on
every rank BEFORE DeepSpeed unpickles anything, and a bad file is one line naming it, exit 2."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from mcd_scale.checkpoint.integrity import IntegrityError, sha256_file, verify
from tests import tiny_run


@pytest.fixture(scope="module")
def base(tiny_base):
    return tiny_base  # (data, run): the session's shared 2-step run, copied before any change


def _copy(base, tmp_path):
    data, run_dir = base
    dst = str(tmp_path / "run")
    shutil.copytree(run_dir, dst)
    return data, dst, os.path.join(dst, "checkpoints", "step_000002")


def test_record_lists_every_file_with_size_and_digest(base, tmp_path):
    _, _, ckpt = _copy(base, tmp_path)
    record = json.load(open(os.path.join(ckpt, "COMPLETE")))["files"]
    on_disk = sorted(n for n in os.listdir(ckpt) if n != "COMPLETE")
    assert sorted(record) == on_disk and any(n.endswith(".pt") for n in on_disk)
    for name, entry in record.items():
        path = os.path.join(ckpt, name)
        assert entry == {"size": os.path.getsize(path), "sha256": sha256_file(path)}
    assert verify(ckpt) == "ok"
    with open(os.path.join(ckpt, "train_state.json"), "a") as fh:  # one byte changes the digest
        fh.write(" ")
    with pytest.raises(IntegrityError, match="train_state.json"):
        verify(ckpt)


def _refused(res, name):
    lines = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and len(lines) == 1 and name in lines[0], res.stderr[-2000:]


def test_pickle_payload_in_model_states_is_never_unpickled(base, tmp_path):
    data, run_dir, ckpt = _copy(base, tmp_path)
    marker = str(tmp_path / "payload_ran")
    tiny_run.pickle_payload(os.path.join(ckpt, "mp_rank_00_model_states.pt"), marker)
    before = tiny_run.tree_digest(run_dir)
    res = tiny_run.train(run_dir, data, "train.steps=3")
    _refused(res, "mp_rank_00_model_states.pt")
    assert not os.path.exists(marker), "DeepSpeed unpickled a file that failed verification"
    assert tiny_run.tree_digest(run_dir) == before  # config.resolved.yaml included


def test_truncated_optimizer_states_exit_2_naming_the_file(base, tmp_path):
    data, run_dir, ckpt = _copy(base, tmp_path)
    pt = [n for n in os.listdir(ckpt) if n.endswith("optim_states.pt")][0]
    path = os.path.join(ckpt, pt)
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    before = tiny_run.tree_digest(run_dir)
    res = tiny_run.train(run_dir, data, "train.steps=3")
    _refused(res, pt)
    assert tiny_run.tree_digest(run_dir) == before
