"""Untrusted files (docs/reliability.md, "Pickle payloads"): a pickle payload placed in a checkpoint's DeepSpeed
``.pt`` file, in a shard member or in a shard's index sidecar is never executed. The payload would create a
marker file when unpickled; every test checks that the marker was not created.

Checkpoints: DeepSpeed's own loader unpickles (``torch.load(weights_only=False)``), so every rank verifies the
tag's completion record (size + sha256 of every file, mcd_scale/checkpoint/integrity.py) before DeepSpeed opens anything.
Shards: members and index sidecars are read with ``np.load(allow_pickle=False)``; the tests keep the member size
and update the manifest's digests, so that is the only defence left standing.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import uuid

import pytest

from tests import tiny_run
from tests.faults import common
from tests.faults.test_bad_data import BAD_KEY, rewrite_member


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def short_marker() -> str:
    """A short path (the payload must fit in a 192-byte shard member); removed by the tests that create it."""
    return f"/tmp/mcdpk_{uuid.uuid4().hex[:8]}"


def pickled_npy(marker: str, size: int) -> bytes:
    """An .npy file of dtype object (numpy unpickles those only with allow_pickle=True), padded to ``size``."""
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header = header + " " * (128 - 10 - 1 - len(header)) + "\n"
    blob = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1")
    blob += pickle.dumps(_Payload(marker), protocol=2)
    assert len(blob) <= size, len(blob)
    return blob + b"\x00" * (size - len(blob))


def test_pickled_npy_payload_really_runs_when_unpickled(tmp_path):
    """The payload is live: numpy with allow_pickle=True runs it (so the tests below can fail)."""
    import io

    import numpy as np

    marker = str(tmp_path / "ran")
    try:
        np.load(io.BytesIO(pickled_npy(marker, 400)), allow_pickle=True)
    except Exception:  # the unpickled object is no array; the side effect already happened
        pass
    assert os.path.exists(marker)


@pytest.mark.parametrize("skip", [False, True])
def test_payload_in_a_shard_member_is_never_unpickled(corpus, tmp_path, skip):
    from mcd_scale.data.loader import open_prepared
    from mcd_scale.data.shards import ShardError

    data = str(tmp_path / "data")
    shutil.copytree(corpus, data)
    marker = short_marker()
    try:
        shard = rewrite_member(data, BAD_KEY, pickled_npy(marker, 192))
        ds = open_prepared(data, "train", vocab_size=common.VOCAB, seq_len=common.SEQ, skip_corrupt=skip)
        if skip:
            assert ds[BAD_KEY] is None and ds.skipped == 1
        else:
            with pytest.raises(ShardError, match="allow_pickle") as err:
                ds[BAD_KEY]
            assert os.path.basename(shard) in str(err.value) and f"{BAD_KEY:010d}" in str(err.value)
        assert not os.path.exists(marker), "a shard member was unpickled"
    finally:
        if os.path.exists(marker):
            os.remove(marker)


def test_payload_in_a_shard_index_is_never_unpickled(corpus, tmp_path):
    from mcd_scale.cli import input_error_types
    from mcd_scale.data.loader import open_prepared

    data = str(tmp_path / "data")
    shutil.copytree(corpus, data)
    manifest_path = os.path.join(data, "manifest.json")
    manifest = json.load(open(manifest_path))
    rec = manifest["splits"]["train"]["shards"][0]
    index = os.path.join(data, manifest["splits"]["train"]["dir"], rec["index"])
    marker = str(tmp_path / "ran")
    payload = pickled_npy(marker, 400)
    open(index, "wb").write(payload)
    rec["index_sha256"] = hashlib.sha256(payload).hexdigest()  # the digest agrees: only allow_pickle=False is left
    json.dump(manifest, open(manifest_path, "w"))
    ds = open_prepared(data, "train", vocab_size=common.VOCAB, seq_len=common.SEQ)
    with pytest.raises(input_error_types()) as err:
        ds[0]
    assert rec["index"] in str(err.value) or rec["name"] in str(err.value), err.value
    assert not os.path.exists(marker), "a shard index was unpickled"


def test_payload_in_optimizer_states_pt_is_never_unpickled(corpus, tmp_path):
    """The ZeRO optimizer file (the model-states file: tests/test_checkpoint_integrity.py): resume refuses it
    before DeepSpeed opens anything, one line naming it, exit 2, the run directory untouched."""
    run = str(tmp_path / "run")
    sets = ["train.steps=2", "checkpoint.every=2"]
    first = common.launch(common.train_argv("teacher", run, corpus, None, sets), 1)
    assert first.codes == [0], first.log
    ckpt = os.path.join(run, "checkpoints", "step_000002")
    pt = [n for n in os.listdir(ckpt) if n.endswith("optim_states.pt")][0]
    marker = str(tmp_path / "ran")
    tiny_run.pickle_payload(os.path.join(ckpt, pt), marker)
    before = tiny_run.tree_digest(run)
    res = common.launch(common.train_argv("teacher", run, corpus, None, ["train.steps=3", "checkpoint.every=2"]), 1)
    assert res.codes == [2], res.log[-4000:]
    assert "Traceback" not in res.log and pt in res.log, res.log[-4000:]
    assert not os.path.exists(marker), "DeepSpeed unpickled a file that failed verification"
    assert tiny_run.tree_digest(run) == before
    common.record("pickle payloads", files=[pt, "mp_rank_00_model_states.pt (test_checkpoint_integrity)",
                                            "shard member .npy", "shard index .idx.npy"], executed=0)
