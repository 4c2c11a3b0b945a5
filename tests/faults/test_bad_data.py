"""Bad data through the real CLI (docs/reliability.md, "Bad data"): a token id >= vocab, a wrong dtype, a wrong
shape in a shard, and an empty shard list are named errors (shard, key, what is wrong) -- exit 2, one line, no
traceback; with ``data.skip_corrupt=true`` the same bad sample is skipped, counted and its key logged.

The shards are altered the way a buggy writer would leave them: same member size (so the shard index and the
manifest's byte count still agree) and the manifest's digest updated, so only the sample check can catch it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile

import numpy as np
import pytest

from tests.faults import common

BAD_KEY = 5  # sample id altered in the first train shard


def rewrite_member(data_dir: str, gid: int, payload: bytes, split_name: str = "train") -> str:
    """Replace sample ``gid``'s ids.npy in its shard by ``payload`` (same size), keep the manifest true."""
    manifest_path = os.path.join(data_dir, "manifest.json")
    manifest = json.load(open(manifest_path))
    split = manifest["splits"][split_name]
    rec = next(r for r in split["shards"] if r["first_id"] <= gid <= r["last_id"])
    shard = os.path.join(data_dir, split["dir"], rec["name"])
    blob = bytearray(open(shard, "rb").read())
    with tarfile.open(shard) as tf:
        member = tf.getmember(f"{gid:010d}.ids.npy")
        assert member.size == len(payload), (member.size, len(payload))
        blob[member.offset_data:member.offset_data + member.size] = payload
    with open(shard, "wb") as fh:
        fh.write(bytes(blob))
    rec["sha256"] = hashlib.sha256(bytes(blob)).hexdigest()
    json.dump(manifest, open(manifest_path, "w"), indent=1, sort_keys=True)
    return shard


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _copy(corpus, tmp_path) -> str:
    dst = str(tmp_path / "data")
    shutil.copytree(corpus, dst)
    return dst


def _one_line_exit_2(res, *must):
    for r, code in enumerate(res.codes):
        assert code == 2, (res.codes, res.log[-4000:])
    assert "Traceback" not in res.log, res.log[-4000:]
    for r in range(len(res.codes)):
        part = res.log.split(f"----- rank {r} -----", 1)[1].split("----- rank ", 1)[0]
        lines = [x for x in part.splitlines() if x.strip() and "warn" not in x.lower()
                 and not x.startswith("  ") and "step " not in x]
        assert len(lines) == 1, (r, lines)
        for m in must:
            assert m in lines[0], (m, lines[0])
    return res


SEQ_ZERO = np.zeros(common.SEQ, dtype=np.uint16)
CASES = {
    "token_id_ge_vocab": (np.where(np.arange(common.SEQ) == 3, common.VOCAB + 7, SEQ_ZERO).astype(np.uint16),
                          f"token id {common.VOCAB + 7} >= vocab_size {common.VOCAB}"),
    "wrong_dtype": (np.zeros(common.SEQ, dtype=np.float16), "float16"),
    "wrong_shape": (np.zeros((2, common.SEQ // 2), dtype=np.uint16), f"({common.SEQ},)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sample_read_is_a_named_error(corpus, tmp_path, case):
    """In process (fast): the reader's error names the shard, the key and what is wrong."""
    from mcd_scale.data.loader import open_prepared
    from mcd_scale.data.shards import ShardError

    array, words = CASES[case]
    data = _copy(corpus, tmp_path)
    shard = rewrite_member(data, BAD_KEY, npy(array))
    ds = open_prepared(data, "train", vocab_size=common.VOCAB, seq_len=common.SEQ)
    assert ds[BAD_KEY - 1] is not None
    with pytest.raises(ShardError) as err:
        ds[BAD_KEY]
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in (shard, f"{BAD_KEY:010d}", words)), msg


CLI_CASES = [c if c == "token_id_ge_vocab" else pytest.param(c, marks=pytest.mark.skipif(
    not common.long_variant(), reason="long variant (tools/dev/faults.py): one launch each")) for c in sorted(CASES)]


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_sample_is_a_named_error_exit_2(corpus, tmp_path, case):
    array, words = CASES[case]
    data = _copy(corpus, tmp_path)
    shard = rewrite_member(data, BAD_KEY, npy(array))
    # global batch 348 = the whole split: step 1 reads every sample, so the bad one surely. One rank here; the
    # 2-rank case (peers stop too) is test_bad_sample_on_one_rank_stops_every_rank.
    res = common.launch(common.train_argv("teacher", str(tmp_path / "run"), data, None, [
        "train.steps=1", "checkpoint.every=0", "parallel.micro_batch=58", "parallel.global_batch=348"]), 1)
    _one_line_exit_2(res, os.path.basename(shard), f"{BAD_KEY:010d}", words)


def test_bad_sample_on_one_rank_stops_every_rank(corpus, tmp_path):
    """2 ranks; only rank 1's sample of step 2 is bad, and a reader worker prefetches it during step 1. Every rank
    exits 2 at step 2 with one line (rank 1 the reader's, rank 0 'stopping: rank 1 hit a bad input: <it>'), no
    traceback (before: rank 0 failed in the gradient reduction, exit 1); step 1's checkpoint stays whole."""
    import time

    from mcd_scale.checkpoint.store import read_latest, verify_tag
    from mcd_scale.data.loader import open_prepared
    from mcd_scale.data.sampler import GlobalBatchSampler

    data = _copy(corpus, tmp_path)
    n = len(open_prepared(data, "train", vocab_size=common.VOCAB, seq_len=common.SEQ))
    gid = GlobalBatchSampler(n, 4, seed=11).rank_slice(1, 1, 2, 2)[0][0]  # step 2 (0-based 1), dp rank 1 of 2
    array, words = CASES["token_id_ge_vocab"]
    shard = rewrite_member(data, gid, npy(array))
    run = str(tmp_path / "run")
    t0 = time.time()
    res = common.launch(common.train_argv("teacher", run, data, None, [  # seed 11, micro 2, global 4 (common.TEACHER)
        "train.steps=2", "checkpoint.every=1", "data.num_workers=1"]), 2)
    _one_line_exit_2(res, os.path.basename(shard), f"{gid:010d}", words)
    assert "stopping: rank 1 hit a bad input: " in res.log.split("----- rank 1 -----")[0], res.log[-4000:]
    assert "stopping:" not in res.log.split("----- rank 1 -----")[1], res.log[-4000:]
    assert [r["step"] for r in common.rows(run) if r.get("split") == "train"] == [1]  # step 2 never trained
    root = os.path.join(run, "checkpoints")
    assert common.checkpoint_tags(run) == ["step_000001"] and read_latest(root) == "step_000001"
    verify_tag(root, "step_000001")  # every file as its record says (IntegrityError otherwise)
    common.record("bad data, one rank of 2", exit_codes=res.codes, exit_s=[round(s, 1) for s in res.exit_s],
                  launch_to_last_exit_s=round(max(res.exit_wall) - t0, 1))


def test_bad_validation_sample_on_one_rank_stops_every_rank(corpus, tmp_path):
    """The same in the validation pass (eval set: val ids 0-15 in order, dp rank 1 reads 2 and 3 of the first batch):
    every rank exits 2 with one line before the NELBO is logged."""
    data = _copy(corpus, tmp_path)
    array, words = CASES["token_id_ge_vocab"]
    shard = rewrite_member(data, 2, npy(array), "val")
    run = str(tmp_path / "run")
    res = common.launch(common.train_argv("teacher", run, data, None, [
        "train.steps=2", "train.eval_every=1", "checkpoint.every=0"]), 2)
    _one_line_exit_2(res, os.path.join("val", os.path.basename(shard)), f"{2:010d}", words)
    assert "stopping: rank 1 hit a bad input: " in res.log.split("----- rank 1 -----")[0], res.log[-4000:]
    assert not [r for r in common.rows(run) if r.get("split") == "val"]


def test_stand_in_carries_the_error_line_whatever_the_workers(corpus, tmp_path):
    """In process: the trainer's loader (stand_in) puts a readable sample in the bad one's place and the reader's
    one line in that micro-batch only, with 0 or 1 prefetching workers; without stand_in the error is raised."""
    from mcd_scale.data.loader import MicroBatchLoader, open_prepared
    from mcd_scale.data.sampler import GlobalBatchSampler
    from mcd_scale.data.shards import ShardError

    data = _copy(corpus, tmp_path)
    shard = rewrite_member(data, BAD_KEY, npy(CASES["token_id_ge_vocab"][0]))
    ds = open_prepared(data, "train", vocab_size=common.VOCAB, seq_len=common.SEQ)
    for workers in (0, 1):
        loader = MicroBatchLoader(ds, GlobalBatchSampler(len(ds), 4, seed=0, shuffle=False), 0, 1, 2, start_step=0,
                                  num_workers=workers, max_steps=3, stand_in=True)
        batches = list(loader)
        assert [("bad_input" in b) for b in batches] == [False, False, True, False, False, False], workers
        line = batches[2]["bad_input"]
        assert "\n" not in line and shard in line and f"{BAD_KEY:010d}" in line and "Traceback" not in line, line
        assert batches[2]["sample_id"].tolist() == [4, 6] and batches[2]["ids"].shape == (2, common.SEQ)
    with pytest.raises(ShardError):
        list(MicroBatchLoader(ds, GlobalBatchSampler(len(ds), 4, seed=0, shuffle=False), 0, 1, 2, start_step=0,
                              max_steps=3))


def _empty_train_split(corpus, tmp_path) -> str:
    data = _copy(corpus, tmp_path)
    manifest_path = os.path.join(data, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["splits"]["train"].update(shards=[], num_samples=0)
    json.dump(manifest, open(manifest_path, "w"))
    return data


def test_empty_shard_list_open_is_a_named_error(corpus, tmp_path):
    from mcd_scale.cli import input_error_types
    from mcd_scale.data.loader import open_prepared

    data = _empty_train_split(corpus, tmp_path)
    with pytest.raises(input_error_types()) as err:
        ds = open_prepared(data, "train", vocab_size=common.VOCAB, seq_len=common.SEQ)
        from mcd_scale.data.sampler import GlobalBatchSampler

        GlobalBatchSampler(len(ds), 4, 1)  # what the trainer does next with it
    assert "manifest.json" in str(err.value) and "train" in str(err.value), err.value


@pytest.mark.skipif(not common.long_variant(), reason="long variant (tools/dev/faults.py): one launch")
def test_empty_shard_list_is_a_named_error_exit_2(corpus, tmp_path):
    data = _empty_train_split(corpus, tmp_path)
    res = common.launch(common.train_argv("teacher", str(tmp_path / "run"), data, None, ["train.steps=1"]), 1)
    _one_line_exit_2(res, "manifest.json", "empty")


def test_opt_in_skip_counts_and_names_the_skipped_key(corpus, tmp_path):
    data = _copy(corpus, tmp_path)
    rewrite_member(data, BAD_KEY, npy(CASES["token_id_ge_vocab"][0]))
    run = str(tmp_path / "run")
    res = common.launch(common.train_argv("teacher", run, data, None, [
        "train.steps=1", "checkpoint.every=0", "parallel.micro_batch=58", "parallel.global_batch=348",
        "data.skip_corrupt=true"]), 2)  # 2 ranks: the skip is local, no rank waits for another
    assert res.codes == [0, 0], res.log[-4000:]
    lines = [x for x in res.log.splitlines() if "under data.skip_corrupt" in x]
    assert len(lines) == 1 and f"keys {BAD_KEY:010d};" in lines[0] and "skipped 1 " in lines[0], lines
    assert re.search(r"\[rank \d\] step 1:", lines[0])
    common.record("bad data", cases=sorted(CASES) + ["empty_shard_list"], exit_code=2, skip_logged=lines[0])
