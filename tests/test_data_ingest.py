"""Corpus inputs of every kind (jsonl/txt/parquet, plain/.gz/.zst, datasets directories) through the pipeline
with a real pretrained tokenizer: the shards decode back to exactly the input documents, in corpus order,
each split as the keyed hash says; bad rows are one line naming file and line/row, or counted skips."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mcd_scale.data.ingest import IngestError, find_sources, iter_documents
from mcd_scale.data.prepare import PrepareError, PrepareOptions, prepare
from mcd_scale.data.tokenizer import load_tokenizer
from mcd_scale.rng import key_to_seed
from tests.data_fixtures import make_documents, read_split_docs, smollm2_tokenizer_dir, write_jsonl
from tests.mp import REPO, base_env

TOOL = os.path.join(REPO, "tools", "prepare_data.py")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    return smollm2_tokenizer_dir(tmp_path_factory)


def _expected_split(seed: int, index: int, heldout: float, val: float) -> str:
    u = key_to_seed("data-split", seed, index) / float(1 << 63)  # the documented key, computed independently
    return "heldout" if u < heldout else "val" if u < heldout + val else "train"


def _opts(inputs, out, tok, **kw) -> PrepareOptions:
    base = dict(inputs=inputs, out=str(out), tokenizer=tok, seq_len=64, seed=7, val=0.1, heldout=0.1,
                samples_per_shard=8, progress=False, chunk_docs=16)
    base.update(kw)
    return PrepareOptions(**base)


def test_jsonl_zst_wrap_decodes_back_to_the_documents(tmp_path, smol):
    docs = make_documents(300, seed=1)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # three files in name order, three compressions; directory expansion must keep that order
    write_jsonl(str(corpus / "a.jsonl.zst"), [{"text": d, "id": i} for i, d in enumerate(docs[:100])], "zst")
    write_jsonl(str(corpus / "b.jsonl.gz"), [{"text": d} for d in docs[100:200]], "gz")
    write_jsonl(str(corpus / "c.jsonl"), [{"text": d} for d in docs[200:]])
    out = tmp_path / "out"
    m = prepare(_opts([str(corpus)], out, smol))
    tok = load_tokenizer(str(out))
    assert tok.kind == "hf" and m["vocab_size"] == 49152 and m["mask_id"] == 49152 and m["dtype"] == "uint16"
    assert (m["bos_id"], m["eos_id"], m["pad_id"]) == (1, 2, 2) and m["num_documents"] == 300
    assert {f["path"] for f in m["tokenizer"]["files"]} == {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"}
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(smol)
    for split in ("train", "val", "heldout"):
        want = [d for i, d in enumerate(docs) if _expected_split(7, i, 0.1, 0.1) == split]
        got = read_split_docs(str(out), split)
        assert len(got) == len(want) > 0
        assert [tok.decode(g) for g in got] == want  # whole documents, corpus order, BOS ... EOS each
        for g, w in zip(got[:20], want[:20]):  # the HF library's own ids
            assert g == ref(w, add_special_tokens=False)["input_ids"]
    assert m["num_tokens"] == sum(len(x) + 2 for x in tok.encode(docs))
    assert [s["path"].endswith(n) for s, n in zip(m["sources"], ("a.jsonl.zst", "b.jsonl.gz", "c.jsonl"))] == [True] * 3
    assert m["sources"][0]["bytes"] == os.path.getsize(corpus / "a.jsonl.zst")


def test_parquet_datasets_and_txt_inputs(tmp_path, smol):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_documents(60, seed=2)
    pq.write_table(pa.table({"body": docs[:30], "n": list(range(30))}), str(tmp_path / "p.parquet"))
    raw = tmp_path / "p.parquet"
    (tmp_path / "q.parquet.gz").write_bytes(gzip.compress(raw.read_bytes(), mtime=0))
    datasets.Dataset.from_dict({"body": docs[30:]}).save_to_disk(str(tmp_path / "ds"))
    for inputs, want in (([str(raw)], docs[:30]), ([str(tmp_path / "q.parquet.gz")], docs[:30]),
                         ([str(tmp_path / "ds")], docs[30:]), ([str(raw), str(tmp_path / "ds")], docs)):
        found = [d.payload for d in iter_documents(find_sources(inputs), "body")]
        assert found == want, inputs
    out = tmp_path / "out"
    prepare(_opts([str(raw), str(tmp_path / "ds")], out, smol, text_field="body", val=0, heldout=0))
    tok = load_tokenizer(str(out))
    assert [tok.decode(d) for d in read_split_docs(str(out), "train")] == docs
    # plain text: paragraphs (blank lines, also whitespace-only ones) or whole files
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("one\ntwo\n\n  \t\nthree\r\n\r\nfour")
    (tmp_path / "t" / "b.txt.gz").write_bytes(gzip.compress("five\n\nsix\n".encode(), mtime=0))
    paras = [d.payload.decode() for d in iter_documents(find_sources([str(tmp_path / "t")]), "text", "blank-line")]
    assert paras == ["one\ntwo", "three", "four", "five", "six"]
    files = [d.payload.decode() for d in iter_documents(find_sources([str(tmp_path / "t")]), "text", "file")]
    assert files == ["one\ntwo\n\n  \t\nthree\n\nfour", "five\n\nsix\n"]


def test_pad_packing_counts_truncation(tmp_path, smol):
    docs = ["short one", "a somewhat longer document " * 10, "tiny"]
    write_jsonl(str(tmp_path / "c.jsonl"), [{"text": d} for d in docs])
    m = prepare(_opts([str(tmp_path / "c.jsonl")], tmp_path / "out", smol, pack="pad", seq_len=16, val=0, heldout=0))
    tok = load_tokenizer(str(tmp_path / "out"))
    lens = [len(x) + 2 for x in tok.encode(docs)]
    assert m["splits"]["train"]["num_samples"] == 3
    assert m["truncated_documents"] == 1 and m["truncated_tokens"] == lens[1] - 16
    assert m["pad_tokens"] == (16 - lens[0]) + (16 - lens[2])
    from mcd_scale.data.loader import open_prepared

    ds = open_prepared(str(tmp_path / "out"), "train", vocab_size=49152, seq_len=16)
    first = ds[0]["ids"].tolist()
    assert first[0] == 1 and first[lens[0] - 1] == 2 and set(first[lens[0]:]) == {2}
    assert tok.decode(first[1:lens[0] - 1]) == "short one"
    assert ds[1]["ids"][0] == 1 and 2 not in ds[1]["ids"].tolist()  # truncated: no EOS


@pytest.mark.parametrize("line, words", [
    ('{"txt": "no text field"}', "has no field 'text'"),
    ('{"text": 17}', "is int, not a string"),
    ('{"text": "unterminated', "not a JSON line"),
    (b'{"text": "caf\xe9"}', "not UTF-8"),
])
def test_bad_rows_name_file_and_line_or_are_counted_skips(tmp_path, smol, line, words):
    rows = [{"text": "good one"}, {"text": "good two"}, line if isinstance(line, str) else None, {"text": "good four"}]
    path = tmp_path / "c.jsonl"
    write_jsonl(str(path), [r for r in rows if r is not None] if not isinstance(line, str) else rows)
    if isinstance(line, bytes):  # raw bytes as line 3
        lines = path.read_bytes().split(b"\n")
        path.write_bytes(b"\n".join(lines[:2] + [line] + lines[2:]))
    with pytest.raises(PrepareError) as err:
        prepare(_opts([str(path)], tmp_path / "out", smol, val=0, heldout=0))
    assert f"{path}:3" in str(err.value) and words in str(err.value) and "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "out" / "manifest.json")
    m = prepare(_opts([str(path)], tmp_path / "skip", smol, val=0, heldout=0, skip_bad_docs=True))
    assert m["num_documents"] == 3 and len(m["skipped_documents"]) == 1
    assert m["skipped_documents"][0]["where"] == f"{path}:3" and m["skipped_documents"][0]["document"] == 2
    tok = load_tokenizer(str(tmp_path / "skip"))
    assert [tok.decode(d) for d in read_split_docs(str(tmp_path / "skip"), "train")] == ["good one", "good two",
                                                                                          "good four"]


def test_bad_inputs_via_the_cli(tmp_path, smol):
    """Bad inputs: one line naming the file, exit 2, no traceback (the real CLI for a bad row and a corrupt .zst)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(str(tmp_path / "c.jsonl"), [{"text": "ok"}, {"body": "x"}])
    pq.write_table(pa.table({"body": ["x"]}), str(tmp_path / "p.parquet"))
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "trunc.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    for path, words in ((tmp_path / "p.parquet", "no column 'text'"), (tmp_path / "notes.md", "unknown kind"),
                        (tmp_path / "missing.jsonl", "does not exist")):
        with pytest.raises(PrepareError, match=words):
            prepare(_opts([str(path)], tmp_path / "o", smol))
    for path, words in ((tmp_path / "c.jsonl", "c.jsonl:2"), (tmp_path / "trunc.jsonl.zst", "cannot read input")):
        proc = subprocess.run([sys.executable, TOOL, str(path), "--tokenizer", smol, "--out", str(tmp_path / "o"),
                               "--quiet"], env=base_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_ingest_errors_are_input_errors(tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        find_sources([str(tmp_path / "nope.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="holds no .txt"):
        find_sources([str(tmp_path / "empty")])
