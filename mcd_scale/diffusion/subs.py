"""SUBS parameterisation on full-vocabulary logits.

The model's output table has ``padded_vocab`` columns: ids 0..V-1 are real tokens, V is the mask id,
the rest is padding. SUBS: mask and padding logits -> -inf, log-softmax over the V real tokens; at
positions whose input is not the mask the output is a point mass on the input token (carry-over).
(The vocab-parallel form used in training lives beside the losses; this one is the reference.)
"""
from __future__ import annotations

import torch


def subs_log_probs(logits: torch.Tensor, z: torch.Tensor, vocab_size: int, temperature: float = 1.0,
                   carry_over: bool = True) -> torch.Tensor:
    """log p over the *real* vocabulary (last dim = vocab_size), float32 or float64 as given.

    logits: [..., >= vocab_size + 1]; z: [...] input ids (mask id = vocab_size).
    Returns log-probs with last dim ``vocab_size``. With carry_over, unmasked positions are a point mass
    (0 at z, -inf elsewhere).
    """
    real = logits[..., :vocab_size].float() if logits.dtype in (torch.bfloat16, torch.float16) else logits[..., :vocab_size]
    logp = torch.log_softmax(real / temperature, dim=-1)
    if carry_over:
        revealed = z != vocab_size
        if revealed.any():
            point = torch.full_like(logp, float("-inf"))
            point.scatter_(-1, z.clamp(max=vocab_size - 1).unsqueeze(-1), 0.0)
            logp = torch.where(revealed.unsqueeze(-1), point, logp)
    return logp
