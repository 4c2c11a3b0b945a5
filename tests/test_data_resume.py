"""The pipeline's output is a function of inputs and flags only: the same bytes for 1 and 2 workers, after a
crash at a checkpoint, after a kill -9 at a random point; other flags on the same directory are refused."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mcd_scale.data.prepare import PrepareError, PrepareOptions, prepare
from tests.data_fixtures import make_documents, smollm2_tokenizer_dir, write_jsonl
from tests.mp import REPO, base_env

TOOL = os.path.join(REPO, "tools", "prepare_data.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = make_documents(1600, seed=3)
    for k in range(4):
        write_jsonl(str(d / f"part-{k}.jsonl.zst"), [{"text": t} for t in docs[k * 400:(k + 1) * 400]], "zst")
    return str(d)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    return smollm2_tokenizer_dir(tmp_path_factory)


def _files(d: str) -> dict[str, bytes]:
    out = {}
    for root, _dirs, names in os.walk(d):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


def _opts(corpus, out, smol, **kw):
    base = dict(inputs=[corpus], out=str(out), tokenizer=smol, seq_len=64, seed=11, val=0.05, heldout=0.05,
                samples_per_shard=32, chunk_docs=50, progress=False)
    base.update(kw)
    return PrepareOptions(**base)


@pytest.fixture(scope="module")
def reference(corpus, smol, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    m = prepare(_opts(corpus, out, smol))
    assert m["splits"]["train"]["num_samples"] > 5 * 32  # several shards, so there are checkpoints
    return _files(str(out))


def test_workers_give_identical_bytes(corpus, smol, reference, tmp_path):
    # chunks of 37 documents, and chunks cut short by a byte cap of a few documents
    prepare(_opts(corpus, tmp_path / "w2", smol, workers=2, chunk_docs=37, chunk_bytes=2000))
    assert _files(str(tmp_path / "w2")) == reference
    assert not os.path.exists(tmp_path / "w2" / ".prepare-state")


class _Crash(Exception):
    pass


def test_crash_after_a_checkpoint_resumes_to_the_same_bytes(corpus, smol, reference, tmp_path):
    seen = []

    def hook(state):
        seen.append(state["next_doc"])
        if len(seen) == 3:
            raise _Crash()

    out = tmp_path / "out"
    with pytest.raises(_Crash):
        prepare(_opts(corpus, out, smol, checkpoint_hook=hook))
    assert os.path.isfile(out / ".prepare-state" / "state.json") and not os.path.exists(out / "manifest.json")
    kept = {n: os.stat(out / "train" / n).st_mtime_ns for n in os.listdir(out / "train") if n.endswith(".tar")}
    assert kept
    resumed_at = []
    m = prepare(_opts(corpus, out, smol, checkpoint_hook=lambda st: resumed_at.append(st["next_doc"])))
    assert resumed_at and resumed_at[0] > seen[1] > 0  # resumed after the last checkpoint, not from the start
    assert _files(str(out)) == reference
    first = sorted(kept)[0]
    assert os.stat(out / "train" / first).st_mtime_ns == kept[first]  # a finished shard is kept, not rewritten
    assert m["splits"]["train"]["num_samples"] > 0


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_mid_run_then_rerun_gives_the_same_bytes(corpus, smol, reference, tmp_path, workers):
    """With 2 workers the kill also takes the pools (they die with the main process) while shards may be in
    flight in the writer; the rerun (with the same worker count) rewrites those from the checkpoint."""
    out = tmp_path / "out"
    args = [sys.executable, TOOL, corpus, "--tokenizer", smol, "--out", str(out), "--seq-len", "64", "--seed", "11",
            "--val-docs", "0.05", "--heldout-docs", "0.05", "--samples-per-shard", "32", "--chunk-docs", "50",
            "--workers", str(workers), "--quiet"]
    proc = subprocess.Popen(args, env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / ".prepare-state" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill after a few checkpoints that kept shards
        try:
            st = json.loads(state.read_text())  # replaced atomically: never half-written
        except (OSError, ValueError):
            st = {}
        if st.get("generation", 0) >= 3 and st["records"]["train"]:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = subprocess.run(args, env=base_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed_at = re.search(r"resuming at document (\d+)", done.stderr)
    assert resumed_at and int(resumed_at.group(1)) > 0, done.stderr
    assert _files(str(out)) == reference


def test_other_flags_are_refused_and_force_replaces_only_ours(corpus, smol, reference, tmp_path):
    out = tmp_path / "out"
    prepare(_opts(corpus, out, smol))
    (out / "notes.txt").write_text("the user's own file")
    again = prepare(_opts(corpus, out, smol))  # same flags: complete, nothing rewritten
    assert again.get("up_to_date") is True
    with pytest.raises(PrepareError, match="other flags or inputs .*seq_len.*--force") as err:
        prepare(_opts(corpus, out, smol, seq_len=32))
    assert "\n" not in str(err.value)
    proc = subprocess.run([sys.executable, TOOL, corpus, "--tokenizer", smol, "--out", str(out), "--quiet"],
                          env=base_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert _files(str(out)) == reference | {"notes.txt": b"the user's own file"}
    prepare(_opts(corpus, out, smol, seq_len=512, samples_per_shard=1024, force=True))
    left = _files(str(out))
    assert left["notes.txt"] == b"the user's own file"
    assert "train/shard-000001.tar" not in left and "train/shard-000000.tar" in left  # old shards gone


def test_tokenizing_workers_start_light_and_return_one_buffer_per_chunk(smol, tmp_path):
    """A spawned worker imports the encoder, not prepare's imports that reach torch (~2 s of CPU per worker,
    part of every run's time), and the shard writer runs without torch; a chunk comes back as one ids buffer with per-document lengths (-1: bad)."""
    from mcd_scale.data.prepare_worker import encode_chunk
    from mcd_scale.data.prepare import _Encoder
    from mcd_scale.data.tokenizer import load_tokenizer

    from mcd_scale.data.prepare_worker import write_shard

    encoder = _Encoder(2, (smol, "text", False, "uint16"))
    try:
        assert encoder.pool.apply(eval, ("'torch' in __import__('sys').modules",)) is False
        # the shard writer: webdataset without torch (~220 MB less per writer), same bytes as with it
        rows = np.arange(24, dtype=np.uint16).reshape(3, 8)
        ours = encoder.writer_pool.apply(write_shard, (str(tmp_path / "pool"), 0, 5, rows))
        assert encoder.writer_pool.apply(eval, ("__import__('sys').modules.get('torch', 0)",)) is None
        here = write_shard(str(tmp_path / "here"), 0, 5, rows)  # this process has torch (webdataset imported it)
        assert ours["sha256"] == here["sha256"] and ours["num_samples"] == 3 and ours["first_id"] == 5
        chunk = [("jsonl", b'{"text": "hello world"}', "f:1"), ("jsonl", b'{"body": 1}', "f:2"),
                 ("text", "caf\u00e9 au lait".encode("utf-8"), "f:3")]
        ids, lengths, bad, nbytes = encoder.pool.apply(encode_chunk, (chunk,))
    finally:
        encoder.close()
    tok = load_tokenizer(smol)
    first, third = tok.encode(["hello world", "caf\u00e9 au lait"])
    assert ids.dtype == "uint16" and lengths.tolist() == [len(first), -1, len(third)]
    assert ids.tolist() == first.tolist() + third.tolist()
    assert [w for w, _ in bad] == ["f:2"] and nbytes == len(chunk[0][1]) + len(chunk[2][1])


def test_crash_with_two_workers_resumes_to_the_same_bytes(corpus, smol, reference, tmp_path):
    """With --workers 2 the shards are written by the writer pool: a crash in the main process stops the pools
    with shards possibly in flight (half-written temporaries, or written and not yet recorded); the rerun
    writes them again from the checkpoint and ends with the uninterrupted run's bytes."""
    seen = []

    def hook(state):
        seen.append(state)
        if len(seen) == 4:
            raise _Crash()

    out = tmp_path / "out"
    with pytest.raises(_Crash):
        prepare(_opts(corpus, out, smol, workers=2, chunk_docs=20, checkpoint_hook=hook))
    assert seen[-1]["records"]["train"]  # shards were written (and recorded) before the crash
    resumed_at = []
    prepare(_opts(corpus, out, smol, workers=2, chunk_docs=20,
                  checkpoint_hook=lambda st: resumed_at.append(st["next_doc"])))
    assert resumed_at and resumed_at[0] > 0
    assert _files(str(out)) == reference


class _HeldBack:
    """A stand-in for the writer pool whose results are not ready until released: shards stay in flight."""

    def __init__(self):
        self.calls = []

    def apply_async(self, fn, args):
        pool = self

        class _Result:
            def __init__(self):
                self.value = None

            def ready(self):
                return self.value is not None

            def get(self):
                if self.value is None:
                    self.value = fn(*args)
                return self.value

            wait = get

        r = _Result()
        pool.calls.append(r)
        return r


def test_a_checkpoint_keeps_the_shards_in_flight_as_unwritten(tmp_path):
    """The checkpoint of a run whose shards are still being written holds those shards' sequences as
    not written (records only of written shards); resuming from it gives the same shard bytes."""
    import numpy as np

    from mcd_scale.data.prepare import _SplitWriter

    seqs = [np.arange(j * 8, j * 8 + 8, dtype=np.uint16) for j in range(11)]
    straight = _SplitWriter(str(tmp_path / "straight"), "train", 4)
    for s in seqs:
        straight.add(s)
    straight.flush()

    pool = _HeldBack()
    live = _SplitWriter(str(tmp_path / "resumed"), "train", 4, pool=pool, max_inflight=5)
    for s in seqs:
        live.add(s)
    live.poll()
    assert len(pool.calls) == 2 and live.records == [] and live.next_id == 0  # two shards in flight
    unwritten = live.unwritten()
    assert [u.tolist() for u in unwritten] == [s.tolist() for s in seqs]  # in flight first, then the buffer
    pool.calls[0].get()
    live.poll()
    assert len(live.records) == 1 and live.next_id == 4 and len(live.unwritten()) == 7

    resumed = _SplitWriter(str(tmp_path / "resumed"), "train", 4)  # a rerun from that first checkpoint
    resumed.buffer = list(unwritten)
    resumed.hand_out_full()
    resumed.flush()
    assert resumed.records == straight.records
    assert _files(str(tmp_path / "resumed")) == _files(str(tmp_path / "straight"))
