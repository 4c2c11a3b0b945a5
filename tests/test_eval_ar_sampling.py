"""The KV-cached AR sampler (mcd_scale/eval/ar_sampling.py, the speed reference of tools/bench/sampling.py)
computes what one full causal forward computes: every call's logits equal model(ids) on the sampled ids."""
import pytest
import torch

from mcd_scale.eval.ar_evaluator import ARConfig, CausalLM, _init_weights
from mcd_scale.eval.ar_sampling import generate


def _model(seed=0):
    model = CausalLM(ARConfig(vocab_size=23, max_len=12, hidden=32, layers=2, heads=4, ffn=64)).double().eval()
    _init_weights(model, seed)
    with torch.no_grad():  # non-trivial biases and norms, so a wrong cache slot cannot hide behind zeros
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    return model


def test_cached_logits_equal_the_full_causal_forward():
    model = _model()
    ids, logits = generate(model, 3, 12, seed=5, return_logits=True)
    assert ids.shape == (3, 12) and int(ids.min()) >= 0 and int(ids.max()) < 23
    with torch.no_grad():
        full = model(ids).float()
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


def test_same_key_same_tokens_and_bad_arguments():
    model = _model()
    a, _ = generate(model, 2, 8, seed=1)
    b, _ = generate(model, 2, 8, seed=1)
    c, _ = generate(model, 2, 8, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="max_len"):
        generate(model, 1, 13, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, 1, 4, seed=0, temperature=0.0)
