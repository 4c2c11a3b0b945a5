"""Parameter count and training FLOPs per token (for tokens/s -> TFLOP/s and MFU).

Formula (the "6N + attention" estimate of Kaplan et al. 2020 / the PaLM paper's MFU appendix,
adapted to a bidirectional model, which attends over all L positions instead of ~L/2):

    train FLOPs per token = 6 * N_matmul + 12 * n_layers * hidden * seq_len

* 6 N: each weight multiplies once per token in forward (2 FLOPs per multiply-add) and twice in
  backward (input and weight gradients). ``N_matmul`` counts the weights used in matrix multiplies:
  blocks + output head (the embedding lookup is not a matmul; with tied embeddings the table still
  does one head matmul, so it is counted once). Norms, biases and adaLN vectors are included in N
  (negligible).
* 12 L h s: attention scores QK^T and the weighted sum AV, 2 * 2 * s * h FLOPs per token per layer
  forward, times 3 for forward + backward.
Activation-checkpointing recompute is NOT counted (MFU convention: useful FLOPs only).
"""
from __future__ import annotations

from mcd_scale.config import ModelConfig


def count_parameters(m: ModelConfig) -> int:
    """Exact number of logical parameters of :class:`DiffusionTransformer` for this config."""
    h, f, c, vp = m.hidden, m.ffn_hidden, m.cond_dim, m.padded_vocab
    block = (2 * 2 * h            # two LayerNorms
             + 3 * h * h + 3 * h  # fused QKV
             + h * h + h          # attention output projection
             + f * h + f          # FC1
             + h * f + h)         # FC2
    if m.time_conditioning:
        block += c * 6 * h + 6 * h
    total = vp * h + m.layers * block + 2 * h  # embedding, blocks, final norm
    if m.time_conditioning:
        total += (256 * c + c) + (c * c + c) + (c * 2 * h + 2 * h)  # time MLP, final adaLN
    if not m.tie_embeddings:
        total += vp * h
    return total


def matmul_parameters(m: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: everything but the input embedding table
    (which is only a lookup), plus the head (the tied table when tie_embeddings)."""
    n = count_parameters(m) - m.padded_vocab * m.hidden
    return n + m.padded_vocab * m.hidden if m.tie_embeddings else n


def train_flops_per_token(m: ModelConfig) -> float:
    """6 * N_matmul + 12 * layers * hidden * seq_len (see module docstring)."""
    return 6.0 * matmul_parameters(m) + 12.0 * m.layers * m.hidden * m.seq_len


def forward_flops_per_token(m: ModelConfig) -> float:
    """Inference (forward only): 2 * N_matmul + 4 * layers * hidden * seq_len."""
    return 2.0 * matmul_parameters(m) + 4.0 * m.layers * m.hidden * m.seq_len
