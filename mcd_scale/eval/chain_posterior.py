"""Exact posterior sampling x ~ p(x | z) from the synthetic sources (forward filtering, backward sampling).

Why: the population optimum of the distillation losses (mcd_scale/distill/ideal.py) is an expectation
over clean sequences x ~ p(x | z_t) (the data the student would have been trained on, given its input).
On the synthetic benchmark that posterior is known exactly, so the optimum can be computed, not guessed.

Method, on the pair states y_l = (x_{l-1}, x_l) of :class:`~mcd_scale.eval.synthetic.MarkovChain2`:
- forward filtering: alpha_l(a, b) = P(y_l = (a, b) | evidence at positions <= l), the chain's own
  forward step (leak included), every message kept;
- backward sampling: y_{L-1} ~ alpha_{L-1}; then, with x_{l+1} = b and x_{l+2} = c already drawn,
  P(x_l = a | x_{l+1:}, evidence) ∝ alpha_{l+1}(a, b) P(c | a, b) (later evidence is already in the drawn
  tail: the chain is order 2, so (x_{l+1}, x_{l+2}) screens position l from everything after it).
The regime-switching source (:class:`~mcd_scale.eval.synthetic.switching.SwitchingChain`) is an order-1 chain
over the joint state y_l = (h_l, x_l) (``joint_transition``): forward filtering on y with the evidence on x,
then y_{L-1} ~ alpha_{L-1} and P(y_l = i | y_{l+1} = j, evidence) ∝ alpha_l(i) M[i, j].
Each row consumes exactly L uniforms given by the caller (one for the last pair, one per earlier
position), so the caller keys them (purpose, sample id, seed) and a row's draw does not depend on its
batch neighbours. Everything is float64.
"""
from __future__ import annotations

import numpy as np
import torch

from mcd_scale.eval.synthetic import MarkovChain2, SwitchingChain


def _inverse_cdf_cols(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Column-wise inverse CDF: weights [n, B] (unnormalised, >= 0), u [B] -> index [B]."""
    cdf = torch.cumsum(weights, 0)
    idx = (cdf < (u * cdf[-1]).unsqueeze(0)).sum(0)
    return idx.clamp(max=weights.shape[0] - 1)


def sample_posterior(chain, z: torch.Tensor, uniforms: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """One exact draw of x ~ p(x | revealed tokens of z) per row: LongTensor [B, L] in [0, S).

    z: [B, L], positions equal to the chain's mask id (S) are masked, the others are evidence (kept).
    uniforms: float64 [B, L] in [0, 1), the row's randomness (see the module docstring).
    chunk: rows per forward pass (the stored messages take L * chunk * S^2 float64).
    """
    if isinstance(chain, MarkovChain2):
        sample_chunk = _sample_chunk
    elif isinstance(chain, SwitchingChain):
        sample_chunk = _sample_switching_chunk
    else:
        raise ValueError(f"exact posterior sampling needs a synthetic source (MarkovChain2 or SwitchingChain), got "
                         f"{type(chain).__name__}")
    if z.dim() != 2 or z.shape[1] < 2:
        raise ValueError(f"z must be [B, L] with L >= 2, got shape {tuple(z.shape)}")
    if uniforms.shape != z.shape:
        raise ValueError(f"uniforms must have z's shape {tuple(z.shape)}, got {tuple(uniforms.shape)}")
    S = chain.num_symbols
    revealed = z != S
    if bool(((z < 0) | (z > S)).any()):
        raise ValueError(f"z holds ids outside [0, {S}] (symbols and the mask id {S})")
    out = [sample_chunk(chain, z[i:i + chunk].cpu(), uniforms[i:i + chunk].double().cpu())
           for i in range(0, z.shape[0], chunk)]
    x = torch.cat(out, 0) if out else torch.empty(0, z.shape[1], dtype=torch.long)
    assert bool((x[revealed] == z[revealed]).all()), "posterior draw contradicts the evidence"
    return x


def _sample_chunk(chain, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    B, L = z.shape
    S = chain.num_symbols
    ev, alpha = chain._evidence_and_first_alpha(z, S)                       # ev [L, S, B]
    alphas = [alpha]                                                        # alphas[l - 1]: pair l
    for pos in range(2, L):
        alphas.append(chain._forward_step(alphas[-1], ev[pos]))
    x = torch.empty(B, L, dtype=torch.long)
    last = _inverse_cdf_cols(alphas[-1], u[:, L - 1])                       # pair (x_{L-2}, x_{L-1})
    x[:, L - 2], x[:, L - 1] = last // S, last % S
    cols = torch.arange(B)
    a_all = np.arange(S)[:, None]
    for pos in range(L - 3, -1, -1):
        b, c = x[:, pos + 1], x[:, pos + 2]
        filt = alphas[pos].view(S, S, B)[:, b, cols]                        # alpha_{pos+1}(a, b) [S, B]
        trans = torch.from_numpy(chain.transition_probs(a_all, b.numpy()[None, :], c.numpy()[None, :]))
        x[:, pos] = _inverse_cdf_cols(filt * trans, u[:, pos])
    return x


def _sample_switching_chunk(chain, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    B, L = z.shape
    S = chain.num_symbols
    M = chain.joint_transition()                                            # [H S, H S]
    _, forward = chain.joint_forward(z, S, M)
    alphas = list(forward)                                                  # every message kept for the draws
    x = torch.empty(B, L, dtype=torch.long)
    y = _inverse_cdf_cols(alphas[-1].T, u[:, L - 1])                        # joint state at L - 1
    x[:, L - 1] = y % S
    for pos in range(L - 2, -1, -1):
        y = _inverse_cdf_cols(alphas[pos].T * M[:, y], u[:, pos])
        x[:, pos] = y % S
    return x
