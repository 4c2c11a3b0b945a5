"""The AR evaluator, trained briefly on real text, must rank it above the same tokens shuffled."""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch

from mcd_scale.eval.ar_evaluator import AREvaluator, train_ar_evaluator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def austen_byte_rows(L: int, n: int, offset: int) -> torch.Tensor:
    # Byte-level ids keep the test independent of the tokenizer and of prepared data.
    with gzip.open(os.path.join(REPO, "data", "austen.txt.gz"), "rb") as f:
        raw = f.read(offset + L * n)[offset:]
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).astype(np.int64).reshape(n, L))


def test_trained_evaluator_ranks_real_text_above_shuffled(tmp_path):
    torch.set_num_threads(1)
    train = austen_byte_rows(64, 512, offset=100_000)
    held = austen_byte_rows(64, 48, offset=200_000)
    ev = train_ar_evaluator(train, vocab_size=256, steps=150, seed=0, hidden=64, layers=2, heads=4)
    gen = torch.Generator().manual_seed(0)
    shuffled = torch.stack([row[torch.randperm(row.numel(), generator=gen)] for row in held])
    real_nll, shuf_nll = ev.score(held), ev.score(shuffled)
    assert (real_nll < shuf_nll).mean() >= 0.95
    assert shuf_nll.mean() - real_nll.mean() > 0.3
    ev.save(str(tmp_path))
    again = AREvaluator.load(str(tmp_path))
    # tolerance: save/load round trip of float64 tables: the same numbers, the same float64 ops
    np.testing.assert_allclose(again.score(held), real_nll, rtol=1e-12)
    # tolerance: float64 exp of a mean computed twice: approx default rel 1e-6
    assert again.gen_ppl(held) == pytest.approx(float(np.exp(real_nll.mean())))


def test_bad_inputs_are_named(tmp_path):
    ev = train_ar_evaluator(torch.randint(0, 10, (8, 6)), vocab_size=10, steps=1, seed=0, hidden=16, heads=2)
    with pytest.raises(ValueError, match="max_len"):
        ev.score(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        ev.score(torch.full((1, 6), 10))
    with pytest.raises(FileNotFoundError, match="not an AR evaluator"):
        AREvaluator.load(str(tmp_path))
