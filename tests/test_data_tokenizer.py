"""The tokenizer interface: a real pretrained HF tokenizer gives the HF library's own ids, and one resolver
finds the tokenizer from every kind of source (prepared data, run, tokenizer directory, file)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mcd_scale.data.tokenizer import (HFTokenizer, SentencePieceTokenizer, TokenizerError, load_tokenizer,
                                      train_tokenizer, training_lines)
from tests.data_fixtures import smollm2_tokenizer_dir

DOCS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune...",
        "Line one\nline two\n\n  indented  and   spaced\t tabs",
        "Unicode: café, naïve, 東京, emoji 🙂, math ∑ x² — dashes",
        "Numbers 1234567 3.14159 and code: def f(x): return x**2  # comment",
        " leading space and trailing space "]


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    return smollm2_tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(train_tokenizer(training_lines(DOCS * 20), 360))
    return str(path)


def test_hf_ids_equal_the_hf_library(smol_dir):
    from transformers import AutoTokenizer

    ours = load_tokenizer(smol_dir)
    ref = AutoTokenizer.from_pretrained(smol_dir)
    assert isinstance(ours, HFTokenizer) and ours.kind == "hf"
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id, ours.mask_id) == (49152, 1, 2, 2, 49152)
    assert ours.vocab_size == len(ref)
    assert ours.eos_id == ref.eos_token_id and ours.bos_id == ref.bos_token_id
    for doc, ids in zip(DOCS, ours.encode(DOCS)):
        assert ids.dtype == np.int32
        assert ids.tolist() == ref(doc, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == doc  # byte-level BPE: lossless
    assert set(ours.files) == {"tokenizer.json", "tokenizer_config.json"}


def test_decode_marks_eos_mask_and_drops_bos(smol_dir, sp_model):
    for tok in (load_tokenizer(smol_dir), load_tokenizer(sp_model)):
        a, b = tok.encode(["Hello there", "again"])
        ids = [tok.bos_id, *a, tok.eos_id, tok.mask_id, *b]
        assert tok.decode(ids) == "Hello there\n\n[MASK]again"
        with pytest.raises(TokenizerError, match="outside"):
            tok.decode([tok.vocab_size + 1])


def test_sentencepiece_kind(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer) and tok.kind == "sentencepiece"
    assert tok.mask_id == tok.vocab_size == 360 and tok.eos_id == 2 and tok.bos_id == 1
    assert [tok.decode(i) for i in tok.encode(DOCS)] == DOCS
    assert tok.files == {"tokenizer.model": os.path.abspath(sp_model)}


def test_resolver_sources(tmp_path, smol_dir, sp_model):
    # a tokenizer.json file, a prepared dir (manifest entry), a run dir (config.resolved.yaml -> data.path)
    assert load_tokenizer(os.path.join(smol_dir, "tokenizer.json")).vocab_size == 49152
    prepared = tmp_path / "prepared"
    load_tokenizer(smol_dir).save(str(prepared / "tokenizer"))
    (prepared / "manifest.json").write_text(json.dumps({"tokenizer": {"kind": "hf", "path": "tokenizer"}}))
    assert load_tokenizer(str(prepared)).kind == "hf"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.resolved.yaml").write_text(f"data:\n  path: {prepared}\n")
    assert load_tokenizer(str(run)).vocab_size == 49152
    # the SentencePiece kind through a prepared dir with an old-style manifest entry
    old = tmp_path / "old"
    load_tokenizer(sp_model).save(str(old))
    (old / "manifest.json").write_text(json.dumps({"tokenizer": {"path": "tokenizer.model", "type": "sentencepiece-bpe"}}))
    assert load_tokenizer(str(old)).kind == "sentencepiece"
    # an exported directory: its own tokenizer files win over its config's data.path
    export = tmp_path / "export"
    load_tokenizer(sp_model).save(str(export))
    (export / "config.resolved.yaml").write_text(f"data:\n  path: {prepared}\n")
    assert load_tokenizer(str(export)).kind == "sentencepiece"


@pytest.mark.parametrize("make, match", [
    (lambda p: str(p / "missing.model"), "does not exist"),
    (lambda p: str(p), "holds no tokenizer"),
    (lambda p: (p / "bad.model").write_bytes(b"not a model") and str(p / "bad.model"), "not a SentencePiece model"),
    (lambda p: (p / "manifest.json").write_text('{"tokenizer": {"path": "gone.model"}}') and str(p), "names no tokenizer"),
    (lambda p: (p / "config.resolved.yaml").write_text("data:\n  path: /no/such/dir\n") and str(p), "does not exist here"),
    (lambda p: (p / "tokenizer.json").write_text("{}") and str(p), "Hugging Face tokenizer"),
])
def test_resolver_refuses_bad_sources_in_one_line(tmp_path, make, match):
    with pytest.raises(TokenizerError, match=match) as info:
        load_tokenizer(make(tmp_path))
    assert "\n" not in str(info.value)
