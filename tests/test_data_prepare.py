"""The data tool with a trained SentencePiece tokenizer (the embedded default): determinism, no lost text,
named input errors, the real Austen run through the CLI."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import webdataset

from mcd_scale.data.loader import open_prepared
from mcd_scale.data.manifest import ManifestError, load_manifest, sha256_file
from mcd_scale.data.shards import ShardedDataset
from mcd_scale.data.prepare import PrepareError, PrepareOptions, prepare
from mcd_scale.data.tokenizer import Tokenizer, split_long_line, train_tokenizer, training_lines
from mcd_scale.rng import key_to_seed
from tests.data_fixtures import read_split_docs
from tests.mp import REPO, base_env

TOOL = os.path.join(REPO, "tools", "prepare_data.py")

# A word that occurs only inside one 20 kB line: SentencePiece would skip that line unless we cut it.
LONG_WORD = "zqxjvorpal"


def _corpus() -> str:
    rng = np.random.default_rng(0)
    words = ["the", "of", "and", "Emma", "Harriet", "said", "very", "well", "Mr.", "Knightley", "--", "not"]
    paras = []
    for i in range(60):
        lines = [" ".join(rng.choice(words, size=9)) for _ in range(1 + i % 4)]
        paras.append("\n".join(lines))
    paras[3] = "Tabs\tand  double  spaces, unicode: café ☃ 日本語 \U0001F600 and trailing space "
    paras[7] = " ".join([LONG_WORD] * 2000)  # ~22 kB on one line
    return "\r\n\r\n".join(paras[:30]) + "\n\n   \n\n" + "\n\n".join(paras[30:]) + "\n"


def _run(tmp_path, name: str, **kw) -> str:
    src = tmp_path / "corpus.txt.gz"
    if not src.exists():
        src.write_bytes(gzip.compress(_corpus().encode("utf-8"), mtime=0))
    out = str(tmp_path / name)
    args = dict(inputs=[str(src)], out=out, vocab_size=320, seq_len=32, seed=5, val=0.1,
                heldout=0.1, samples_per_shard=16, progress=False)
    args.update(kw)
    prepare(PrepareOptions(**args))
    return out


def _paragraphs(text: str) -> list[str]:
    """The documented document rule, independently: blocks between lines that hold only spaces/tabs."""
    import re

    text = text.replace("\r\n", "\n")
    return [b.strip("\n") for b in re.split(r"\n(?:[ \t]*\n)+", text) if b.strip()]


def _all_files(d: str) -> dict[str, bytes]:
    out = {}
    for root, _dirs, names in os.walk(d):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


def test_deterministic_and_lossless(tmp_path):
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b")
    files_a = _all_files(a)
    assert files_a == _all_files(b)  # byte-identical: every shard, the tokenizer, the manifest
    assert {"manifest.json", "tokenizer.model", "heldout.txt", "train/shard-000000.tar"} <= set(files_a)
    c = _run(tmp_path, "c", seed=6)
    assert _all_files(c)["train/shard-000000.tar"] != files_a["train/shard-000000.tar"]  # the seed matters

    m = load_manifest(a)
    tok = Tokenizer.from_file(os.path.join(a, "tokenizer.model"))
    assert m["vocab_size"] == tok.vocab_size == 320 and m["mask_id"] == 320 and m["dtype"] == "uint16"
    assert m["tokenizer"]["sha256"] == sha256_file(os.path.join(a, "tokenizer.model"))
    for split in ("train", "val", "heldout"):
        for rec in m["splits"][split]["shards"]:
            assert rec["sha256"] == sha256_file(os.path.join(a, split, rec["name"]))

    # Every document comes back exactly, whole, in corpus order, in the split its keyed hash names.
    docs = _paragraphs(_corpus())
    assert len(docs) == 60 and m["num_documents"] == 60
    for split in ("train", "val", "heldout"):
        want = [d for i, d in enumerate(docs) if _split_of(5, i, 0.1, 0.1) == split]
        got = read_split_docs(a, split)
        assert [tok.sp.decode(g) for g in got] == want and len(want) > 0, split
        ds = open_prepared(a, split, vocab_size=320, seq_len=32)
        assert len(ds) == m["splits"][split]["num_samples"]
        ids = ds[0]["ids"]
        assert ids.dtype == np.uint16 and ids.shape == (32,) and ids.max() < 320 and ids[0] == tok.bos_id
        assert tok.sp.unk_id() not in np.concatenate([ds[i]["ids"] for i in range(len(ds))]).tolist()
    heldout = open(os.path.join(a, "heldout.txt"), encoding="utf-8").read()
    first = open_prepared(a, "heldout", vocab_size=320, seq_len=32)[0]["ids"].tolist()
    assert heldout.startswith(tok.decode(first))


def _split_of(seed: int, index: int, heldout: float, val: float) -> str:
    u = key_to_seed("data-split", seed, index) / float(1 << 63)
    return "heldout" if u < heldout else "val" if u < heldout + val else "train"


def test_long_lines_are_cut_not_skipped():
    line = "abc " * 3000 + "x" * 9000 + " é" * 3000
    pieces = split_long_line(line)
    assert "".join(pieces) == line and len(pieces) > 3
    assert all(len(p.encode("utf-8")) <= 4000 for p in pieces)
    assert pieces[0].endswith(" ")  # cut at whitespace where there is some
    # The only occurrences of LONG_WORD are in one 22 kB line; it must reach the trainer.
    docs = ["the cat sat on the mat\nand so on", " ".join([LONG_WORD] * 2000)]
    tok = Tokenizer(train_tokenizer(training_lines(docs), 290))  # uncut: 10 tokens
    assert len(tok.encode([LONG_WORD])[0]) <= 2, "the long line was skipped by SentencePiece"


def test_bad_inputs_name_the_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    badgz = tmp_path / "bad.txt.gz"
    badgz.write_bytes(b"not gzip at all")
    truncgz = tmp_path / "trunc.txt.gz"
    truncgz.write_bytes(b"\x1f\x8b\x08\x00truncated gzip")  # zlib.error, not OSError
    emptydir = tmp_path / "nothing"
    emptydir.mkdir()
    cases = [(tmp_path / "missing.txt", "does not exist"), (empty, "hold no document"), (truncgz, "cannot read input"),
             (latin, "latin.txt:1: not UTF-8 (byte 3"), (badgz, "cannot read input"), (emptydir, "holds no .txt")]
    for path, words in cases:
        with pytest.raises(PrepareError) as err:
            prepare(PrepareOptions(inputs=[str(path)], out=str(tmp_path / "out"), progress=False))
        assert str(path) in str(err.value) and words in str(err.value), str(err.value)
    assert not os.path.exists(tmp_path / "out" / "manifest.json")
    small = tmp_path / "small.txt"
    small.write_text("a tiny corpus\n\nwith few pieces\n")
    with pytest.raises(PrepareError, match="--vocab-size 5000 is too large"):
        prepare(PrepareOptions(inputs=[str(small)], out=str(tmp_path / "out"), vocab_size=5000, progress=False))
    # The real CLI exits with code 2 and one clear line (no traceback).
    proc = subprocess.run([sys.executable, TOOL, str(latin), "--out", str(tmp_path / "o2")], env=base_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and str(latin) in proc.stderr and "Traceback" not in proc.stderr


def test_austen_cli_and_webdataset(tmp_path):
    """The real corpus through the real CLI (defaults except --out); shards readable by webdataset."""
    out = str(tmp_path / "prepared")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, TOOL, "--out", out, "--no-progress"], env=base_env(),
                          capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 120, f"prepare_data took {elapsed:.1f}s (about 7 s on an idle 2-core machine)"
    m = json.load(open(os.path.join(out, "manifest.json")))
    n = {s: m["splits"][s]["num_samples"] for s in ("train", "val", "heldout")}
    total = sum(n.values())
    assert m["vocab_size"] == 4096 == m["mask_id"] and m["seq_len"] == 128
    assert m["pack"] == "wrap" and m["tokenizer"]["kind"] == "sentencepiece"
    assert total * 128 == m["num_tokens"] + m["pad_tokens"] and m["pad_tokens"] < 3 * 128  # one padded tail per split
    assert abs(n["val"] - 0.05 * total) <= 0.01 * total and n["train"] > 7000
    assert m["sources"][0]["path"] == "data/austen.txt.gz"
    urls = [os.path.join(out, "val", r["name"]) for r in m["splits"]["val"]["shards"]]
    wds = list(webdataset.WebDataset(urls, shardshuffle=False).decode())
    ours = ShardedDataset(os.path.join(out, "val"), manifest=m["splits"]["val"])
    assert len(wds) == len(ours) == n["val"]
    for gid in (0, n["val"] // 2, n["val"] - 1):
        assert wds[gid]["__key__"] == "%010d" % gid
        np.testing.assert_array_equal(wds[gid]["ids.npy"], ours[gid]["ids"])
    with pytest.raises(ManifestError) as err:
        open_prepared(out, "train", vocab_size=4096, seq_len=64)
    assert "seq_len" in str(err.value) and "--seq-len 64" in str(err.value) and "manifest.json" in str(err.value)


def test_index_sidecars_and_legacy_refusal(tmp_path):
    """Every shard gets its index sidecar (in the manifest, with its digest); a forced re-run with fewer
    shards leaves no stale sidecar behind; a manifest written before indexes is refused, naming the fix."""
    out = _run(tmp_path, "a", samples_per_shard=4)
    m = load_manifest(out)
    for split in ("train", "val", "heldout"):
        for rec in m["splits"][split]["shards"]:
            assert rec["index_sha256"] == sha256_file(os.path.join(out, split, rec["index"]))
    many = set(os.listdir(os.path.join(out, "train")))
    with pytest.raises(PrepareError, match="--force"):
        _run(tmp_path, "a", samples_per_shard=64)
    _run(tmp_path, "a", samples_per_shard=64, force=True)
    m = load_manifest(out)
    left = set(os.listdir(os.path.join(out, "train")))
    assert left == {n for r in m["splits"]["train"]["shards"] for n in (r["name"], r["index"])} and left < many

    for rec in m["splits"]["train"]["shards"]:  # what a manifest of the previous tool version held
        del rec["index"], rec["index_sha256"]
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump(m, fh)
    with pytest.raises(ManifestError) as err:
        open_prepared(out, "train", vocab_size=320, seq_len=32)
    assert "manifest.json" in str(err.value) and f"tools/prepare_data.py --out {out}" in str(err.value)
