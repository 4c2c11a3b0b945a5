"""An exact benchmark: a seeded sparse order-2 Markov chain, its true NLL, and an exact oracle denoiser.

Why this benchmark (docs/method.md §8): on text, quality is measured by an evaluator model, and a lower Gen PPL
can be bought with lower entropy. Here the data come from a known generator, so the *true* NLL of any
generated sequence is computable, and the best possible denoiser (the exact posterior) is available.
Parallel reveals (few sampling steps) draw neighbouring tokens independently from their marginals, which
breaks the chain's hard constraints; many steps reveal about one token at a time and recover the chain.

The chain over S symbols:
- order-1 support: every symbol b has ``fanout`` candidate successors ``successors[b]`` (distinct, seeded);
- order-2 selection: a context (a, b) allows ``branching`` of those candidates, with Dirichlet(
  ``concentration``) probabilities ``probs[a, b, slot]`` (zero on the candidates it does not allow);
- a uniform leak: ``P(c | a, b) = (1 - S * floor) * probs(c | a, b) + floor``. Every sequence therefore has
  a finite probability (an "impossible" transition costs ``-log(floor)`` = 13.8 nats at floor 1e-6), and
  the exact posterior exists whatever tokens a sampler has revealed, so the oracle never divides by zero;
- the first two symbols are drawn from the *stationary* distribution of the pair chain, so every position
  is stationary and the expected NLL of a length-L sample is exactly ``(H(pair) + (L - 2) h) / L``.

The oracle runs forward-backward over pair states y_l = (x_{l-1}, x_l) (S^2 states; the sparse part of
the transition costs S^2 * fanout per position, the leak is rank one). Every random draw comes from a
numpy generator seeded by :func:`mcd_scale.rng.key_to_seed` (purpose, ids), never the global RNG.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mcd_scale.eval.synthetic.common import SourceFile, inverse_cdf, inverse_cdf_rows, keyed_rng

FORMAT = "mcd_scale.synthetic.MarkovChain2"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ChainSpec:
    """The scalar hyper-parameters of a :class:`MarkovChain2` (the tables are derived from them)."""
    num_symbols: int = 64
    fanout: int = 8
    branching: int = 3
    concentration: float = 0.5
    floor: float = 1e-6
    seed: int = 0


class MarkovChain2(SourceFile):
    """A sparse order-2 Markov chain with a uniform leak; exact sampling, NLL, entropy and posteriors."""

    def __init__(self, num_symbols: int = 64, branching: int = 3, seed: int = 0, fanout: int = 8,
                 concentration: float = 0.5, floor: float = 1e-6,
                 tables: tuple[np.ndarray, np.ndarray] | None = None):
        """Build the chain from its seed (or from explicit ``tables = (successors, probs)``, see from_json).

        num_symbols: S (the mask id of the benchmark is S). branching <= fanout <= S.
        floor: the leak probability of every symbol in every context; S * floor must be < 1.
        """
        if num_symbols < 2:
            raise ValueError(f"num_symbols must be >= 2, got {num_symbols}")
        if not 1 <= branching <= fanout <= num_symbols:
            raise ValueError(f"need 1 <= branching <= fanout <= num_symbols, got branching={branching}, "
                             f"fanout={fanout}, num_symbols={num_symbols}")
        if not (0.0 < floor and num_symbols * floor < 1.0):
            raise ValueError(f"floor must be in (0, 1/num_symbols), got {floor}")
        if concentration <= 0:
            raise ValueError(f"concentration must be positive, got {concentration}")
        self.spec = ChainSpec(num_symbols, fanout, branching, float(concentration), float(floor), int(seed))
        if tables is None:
            tables = self._draw_tables(self.spec)
        successors, probs = tables
        self.successors = np.asarray(successors, dtype=np.int64)          # [S, F]
        self.probs = np.asarray(probs, dtype=np.float64)                  # [S, S, F]: P(succ[b, g] | a, b)
        self._validate_tables()
        S, F = num_symbols, fanout
        # The smoothed slot probabilities: what the chain really uses for the F candidates of b.
        self.slot_probs = (1.0 - S * floor) * self.probs + floor          # [S, S, F]
        self._csr_fwd, self._csr_bwd = self._sparse_transitions()
        self.pair_stationary = self._stationary_pairs()                   # [S, S] over (x0, x1)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _draw_tables(spec: ChainSpec) -> tuple[np.ndarray, np.ndarray]:
        S, F, K = spec.num_symbols, spec.fanout, spec.branching
        gen = keyed_rng("synthetic.chain", spec.seed, S, F, K)
        successors = np.stack([gen.permutation(S)[:F] for _ in range(S)])
        probs = np.zeros((S, S, F))
        for a in range(S):
            for b in range(S):
                slots = gen.permutation(F)[:K]
                probs[a, b, slots] = gen.dirichlet(np.full(K, spec.concentration))
        return successors, probs

    def _validate_tables(self) -> None:
        S, F = self.spec.num_symbols, self.spec.fanout
        if self.successors.shape != (S, F) or self.probs.shape != (S, S, F):
            raise ValueError(f"chain tables have shapes {self.successors.shape}, {self.probs.shape}; "
                             f"expected {(S, F)} and {(S, S, F)}")
        if self.successors.min() < 0 or self.successors.max() >= S:
            raise ValueError("successors must be symbol ids in [0, num_symbols)")
        if any(len(set(row.tolist())) != F for row in self.successors):
            raise ValueError("each symbol's successors must be distinct")
        if (self.probs < 0).any() or not np.allclose(self.probs.sum(-1), 1.0, atol=1e-9):
            raise ValueError("probs[a, b, :] must be a probability vector for every context (a, b)")

    def _stationary_pairs(self) -> np.ndarray:
        """Stationary distribution of the pair chain, by an exact sparse solve (no power iteration).

        Power iteration fails here: the sparse part alone may be periodic or split into several closed
        classes that only the tiny leak connects, so convergence takes ~1 / (S * floor) steps. Instead,
        write T = T_s + leak, where T_s (the sparse part, rows summing to 1 - S f) makes I - T_s invertible
        and the leak sends pair (a, b) to (b, c) with probability f for every c. Stationarity
        pi = pi T_s + f (r (x) 1), with r(b) = sum_a pi(a, b), gives pi = f (r (x) 1)(I - T_s)^-1, and r
        is the stationary law of the S x S stochastic matrix K = f E (I - T_s)^-1 P (where the chain is
        when it next leaks; K > 0 entrywise, so r is unique). Residual checked to 1e-10.
        """
        # lazy: loads scipy; importing this module does not need it
        import scipy.sparse as sp
        from scipy.sparse.linalg import splu

        S, f = self.spec.num_symbols, self.spec.floor
        a, b, g = np.nonzero(self.probs)
        t_s = sp.csr_matrix(((1.0 - S * f) * self.probs[a, b, g], (a * S + b, b * S + self.successors[b, g])),
                            shape=(S * S, S * S))
        lu = splu(sp.identity(S * S, format="csc") - t_s.tocsc())
        second = np.zeros((S * S, S))                                      # P: pair (x, y) -> y
        second[np.arange(S * S), np.arange(S * S) % S] = 1.0
        kernel = f * lu.solve(second).reshape(S, S, S).sum(1)              # K[b, b'] (E sums over c)
        system = np.vstack([kernel.T - np.eye(S), np.ones((1, S))])
        r = np.linalg.lstsq(system, np.r_[np.zeros(S), 1.0], rcond=None)[0]
        pi = lu.solve(f * np.repeat(r, S), trans="T")                      # row vector times (I - T_s)^-1
        pi = np.clip(pi, 0.0, None)
        pi /= pi.sum()
        check = self._forward_step(torch.from_numpy(pi).unsqueeze(1), None)[:, 0].numpy()
        if not np.abs(check - pi).sum() < 1e-10:
            raise RuntimeError(f"stationary solve inaccurate (residual {np.abs(check - pi).sum():.2e}); "
                               "use a larger floor")
        return pi.reshape(S, S)

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> str:
        """JSON with the spec and the full tables (exact float round-trip), so no RNG is re-run on load."""
        doc = {"format": FORMAT, "version": FORMAT_VERSION, **self.spec.__dict__,
               "successors": self.successors.tolist(), "probs": self.probs.tolist()}
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> "MarkovChain2":
        try:
            doc: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"chain JSON does not parse: {exc}") from exc
        if doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} document "
                             f"(format={doc.get('format')!r}, version={doc.get('version')!r})")
        try:
            return cls(num_symbols=doc["num_symbols"], branching=doc["branching"], seed=doc["seed"],
                       fanout=doc["fanout"], concentration=doc["concentration"], floor=doc["floor"],
                       tables=(np.array(doc["successors"]), np.array(doc["probs"])))
        except KeyError as exc:
            raise ValueError(f"chain JSON lacks field {exc}") from exc

    # ------------------------------------------------------------------ probabilities
    def transition_probs(self, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
        """P(c | a, b) elementwise (leak included), without building the S^3 table."""
        match = self.successors[b] == np.asarray(c)[..., None]              # [..., F]
        p = (self.probs[a, b] * match).sum(-1)                              # 0 if c is not a candidate
        return (1.0 - self.num_symbols * self.spec.floor) * p + self.spec.floor

    def off_support(self, seqs: np.ndarray) -> np.ndarray:
        """bool [n, L - 2]: transition (x[i], x[i+1]) -> x[i+2] is one only the uniform leak explains
        (probability = floor, ~1e-6: ~14 nats each). On this chain the gap between many and few sampling
        steps is almost entirely such transitions, about half of them between neighbours revealed in the
        same step and drawn independently (docs/log.md, "Where the gap comes from")."""
        x = self._check_ids(seqs, "seqs")
        if x.shape[1] < 3:
            return np.zeros((x.shape[0], 0), dtype=bool)
        a, b, c = x[:, :-2], x[:, 1:-1], x[:, 2:]
        match = self.successors[b] == c[..., None]                             # [n, L-2, F]
        return ~((self.probs[a, b] > 0) & match).any(-1)

    def _check_ids(self, seqs: np.ndarray, name: str) -> np.ndarray:
        seqs = np.asarray(seqs)
        if seqs.ndim != 2 or seqs.shape[1] < 2:
            raise ValueError(f"{name} must be [n, L] with L >= 2, got shape {seqs.shape}")
        if seqs.size and (seqs.min() < 0 or seqs.max() >= self.num_symbols):
            raise ValueError(f"{name} contains ids outside [0, {self.num_symbols}) "
                             f"(range {seqs.min()}..{seqs.max()}); masks must be filled before scoring")
        return seqs.astype(np.int64)

    def nll(self, seqs: np.ndarray) -> np.ndarray:
        """Exact NLL per token (nats, averaged over the L tokens of each sequence), float64 [n]."""
        x = self._check_ids(seqs, "seqs")
        logp = np.log(self.pair_stationary[x[:, 0], x[:, 1]])
        if x.shape[1] > 2:
            logp = logp + np.log(self.transition_probs(x[:, :-2], x[:, 1:-1], x[:, 2:])).sum(1)
        return -logp / x.shape[1]

    def entropy_rate(self) -> float:
        """h = sum_{a,b} pi(a,b) H(P(. | a, b)) in nats: the per-token entropy of the stationary chain."""
        S, F, f = self.num_symbols, self.spec.fanout, self.spec.floor
        q = self.slot_probs
        h_ctx = -(q * np.log(q)).sum(-1) - (S - F) * f * math.log(f)       # [S, S]
        return float((self.pair_stationary * h_ctx).sum())

    def expected_nll(self, length: int) -> float:
        """E[nll(x)] for x a length-L sample of the chain, exactly: (H(x0, x1) + (L - 2) h) / L."""
        if length < 2:
            raise ValueError(f"length must be >= 2, got {length}")
        pi = self.pair_stationary
        h_pair = float(-(pi * np.log(pi)).sum())
        return (h_pair + (length - 2) * self.entropy_rate()) / length

    def sample(self, n: int, length: int, seed: int) -> np.ndarray:
        """n exact samples of length L (int64 [n, L]), vectorised over n, keyed by (seed, n, length)."""
        if n < 0 or length < 2:
            raise ValueError(f"need n >= 0 and length >= 2, got n={n}, length={length}")
        S, f = self.num_symbols, self.spec.floor
        gen = keyed_rng("synthetic.sample", seed, n, length)
        out = np.empty((n, length), dtype=np.int64)
        pair = inverse_cdf(np.cumsum(self.pair_stationary.ravel()), gen.random(n))
        out[:, 0], out[:, 1] = pair // S, pair % S
        for pos in range(2, length):
            a, b = out[:, pos - 2], out[:, pos - 1]
            u_leak, u_slot, u_sym = gen.random(n), gen.random(n), gen.integers(0, S, n)
            slot = inverse_cdf_rows(np.cumsum(self.probs[a, b], axis=1), u_slot)
            # The leak is a mixture component: with probability S * floor the next symbol is uniform.
            out[:, pos] = np.where(u_leak < S * f, u_sym, self.successors[b, slot])
        return out

    # ------------------------------------------------------------------ the exact oracle denoiser
    def _sparse_transitions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The non-leak part of the pair transition, (1 - S f) P(c | a, b) from (a, b) to (b, c), as CSR.

        Returns (forward, backward): forward = T^T acts on messages indexed a*S+b, giving b*S+c; backward
        = T. Messages are laid out [S*S, B] (batch last) so a CSR @ dense product needs no permutes.
        """
        S, f = self.num_symbols, self.spec.floor
        a, b, g = np.nonzero(self.probs)
        rows = torch.from_numpy(a * S + b)
        cols = torch.from_numpy(b * S + self.successors[b, g])
        vals = torch.from_numpy((1.0 - S * f) * self.probs[a, b, g])
        with torch.sparse.check_sparse_tensor_invariants(True):
            fwd = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (S * S, S * S)).coalesce()
            bwd = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (S * S, S * S)).coalesce()
        with warnings.catch_warnings():  # "CSR support is in beta": true, and not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            return fwd.to_sparse_csr(), bwd.to_sparse_csr()

    def _forward_step(self, m: torch.Tensor, ev: torch.Tensor | None) -> torch.Tensor:
        """alpha_{l+1}(b, c) = ev(c) sum_a alpha_l(a, b) P(c | a, b), normalised; m: [S*S (a,b), B]."""
        S, B = self.num_symbols, m.shape[1]
        out = (self._csr_fwd @ m).view(S, S, B)                             # (b, c, batch)
        out = out + self.spec.floor * m.view(S, S, B).sum(0).unsqueeze(1)   # the leak: rank one in (b, c)
        if ev is not None:                                                  # ev: [S (c), B]
            out = out * ev.unsqueeze(0)
        out = out.reshape(S * S, B)
        return out / out.sum(0, keepdim=True)

    def _backward_step(self, beta: torch.Tensor, ev: torch.Tensor) -> torch.Tensor:
        """beta_l(a, b) = sum_c P(c | a, b) ev_{l+1}(c) beta_{l+1}(b, c), normalised; beta: [S*S, B]."""
        S, B = self.num_symbols, beta.shape[1]
        w = beta.view(S, S, B) * ev.unsqueeze(0)                            # (b, c, batch)
        out = (self._csr_bwd @ w.reshape(S * S, B)).view(S, S, B)           # (a, b, batch)
        out = (out + self.spec.floor * w.sum(1).unsqueeze(0)).reshape(S * S, B)
        return out / out.sum(0, keepdim=True)

    def oracle_log_marginals(self, z: torch.Tensor, mask_id: int | None = None,
                             chunk: int = 16) -> torch.Tensor:
        """Exact log posterior marginals log P(x_l = v | revealed tokens of z), float64 [B, L, S].

        z: LongTensor [B, L]; positions equal to ``mask_id`` (default S) are masked, others are evidence.
        Revealed positions come back as a point mass (0 at the token, -inf elsewhere), as SUBS does.
        Forward-backward over pair states, batched; ``chunk`` rows at a time bound the memory
        (L * chunk * S^2 float64 for the stored backward messages).
        """
        mask_id = self.mask_id if mask_id is None else int(mask_id)
        if z.dim() != 2 or z.shape[1] < 2:
            raise ValueError(f"z must be [B, L] with L >= 2, got shape {tuple(z.shape)}")
        revealed = z != mask_id
        if bool(((z < 0) | (z >= self.num_symbols))[revealed].any()):
            raise ValueError(f"z holds ids that are neither symbols in [0, {self.num_symbols}) nor the mask "
                             f"id {mask_id}")
        return torch.cat([self._marginals_chunk(z[i:i + chunk], mask_id)
                          for i in range(0, z.shape[0], chunk)], 0) if z.shape[0] else \
            torch.empty(0, z.shape[1], self.num_symbols, dtype=torch.float64)

    def _evidence_and_first_alpha(self, z: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ev [L, S, B], alpha [S*S, B]) of rows z [B, L]: ev[l, v, b] = 1 if x_l = v is compatible with row b
        (all ones where masked); alpha the normalised forward message of pair 1 = (x_0, x_1). Shared by the
        marginals here and the posterior draws of mcd_scale/eval/chain_posterior.py."""
        B, L = z.shape
        S = self.num_symbols
        revealed = z != mask_id
        ev = torch.ones(B, L, S, dtype=torch.float64)
        ev[revealed] = torch.nn.functional.one_hot(z[revealed], S).to(torch.float64)
        ev = ev.permute(1, 2, 0).contiguous()                               # [L, S, B]
        pi = torch.from_numpy(self.pair_stationary).unsqueeze(2)
        alpha = (pi * ev[0].unsqueeze(1) * ev[1].unsqueeze(0)).reshape(S * S, B)
        return ev, alpha / alpha.sum(0, keepdim=True)

    def _marginals_chunk(self, z: torch.Tensor, mask_id: int) -> torch.Tensor:
        B, L = z.shape
        S = self.num_symbols
        ev, alpha = self._evidence_and_first_alpha(z, mask_id)
        # Pair state l (1..L-1) is (x_{l-1}, x_l). Backward messages are stored, forward ones consumed.
        betas = [torch.ones(S * S, B, dtype=torch.float64)]
        for pos in range(L - 1, 1, -1):                                    # beta of pair pos - 1
            betas.append(self._backward_step(betas[-1], ev[pos]))
        betas.reverse()                                                     # betas[l - 1] is pair l's
        marg = torch.empty(L, S, B, dtype=torch.float64)
        for pos in range(1, L):
            if pos > 1:
                alpha = self._forward_step(alpha, ev[pos])
            post = (alpha * betas[pos - 1]).view(S, S, B)
            post = post / post.sum((0, 1), keepdim=True)
            marg[pos] = post.sum(0)
            if pos == 1:
                marg[0] = post.sum(1)
        # Exact zeros (revealed positions) become -inf: a point mass, like SUBS carry-over.
        return torch.log(marg.permute(2, 0, 1))


def affected_windows(z: torch.Tensor, new: torch.Tensor, mask_id: int) -> list[tuple[int, int, int]]:
    """Windows (row, lo, hi) (hi exclusive) whose oracle marginals change when ``new`` tokens are revealed.

    Order-2 Markov property: two consecutive revealed tokens (an anchor pair) fix the pair state, so the
    posterior on one side of it does not depend on the evidence on the other side. A newly revealed token
    can only change the marginals between the nearest anchor pairs (among tokens revealed *before* it) on
    its left and right; the window includes those anchors as evidence. Overlapping windows are merged.
    z: [B, L] after the reveal; new: bool [B, L], the tokens revealed in this step.
    """
    old = ((z != mask_id) & ~new).numpy()
    anchor = np.zeros_like(old)
    anchor[:, 1:] = old[:, 1:] & old[:, :-1]                            # anchor[p]: (p-1, p) both revealed
    windows: list[tuple[int, int, int]] = []
    L = z.shape[1]
    for row in np.nonzero(new.any(1).numpy())[0]:
        starts = np.nonzero(anchor[row])[0]                              # second index of each anchor
        spans = []
        for p in np.nonzero(new[row].numpy())[0]:
            i = np.searchsorted(starts, p)                               # anchors strictly left: starts[:i]
            lo = starts[i - 1] - 1 if i > 0 else 0
            hi = starts[i] + 1 if i < len(starts) else L
            spans.append((int(lo), int(hi)))
        spans.sort()
        merged = [list(spans[0])]
        for lo, hi in spans[1:]:
            if lo < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        windows.extend((int(row), lo, hi) for lo, hi in merged)
    return windows


def refresh_marginals(chain: MarkovChain2, z: torch.Tensor, logp: torch.Tensor, new: torch.Tensor,
                      chunk: int = 16) -> None:
    """Update ``logp`` (the oracle marginals before the reveal) in place to those of ``z`` after it.

    Recomputes only :func:`affected_windows`, shortest first, ``chunk`` windows per batched call, each
    right-padded with masks to the longest in its call: masked positions without evidence after a window
    leave its posterior unchanged (every transition row sums to one), so padding is exact; a window that
    starts at an anchor pair is exact too (the pair is a point mass whatever the prior).
    """
    S = chain.num_symbols
    windows = sorted(affected_windows(z, new, S), key=lambda w: w[2] - w[1])
    for i in range(0, len(windows), chunk):
        group = windows[i:i + chunk]
        width = max(max(hi - lo for _, lo, hi in group), 2)
        batch = torch.full((len(group), width), S, dtype=torch.long)
        for j, (row, lo, hi) in enumerate(group):
            batch[j, :hi - lo] = z[row, lo:hi]
        out = chain.oracle_log_marginals(batch, S, chunk=chunk)
        for j, (row, lo, hi) in enumerate(group):
            logp[row, lo:hi] = out[j, :hi - lo]


def oracle_ancestral_sample(chain, n: int, length: int, steps: int, seed: int,
                            temperature: float = 1.0, chunk: int = 16) -> tuple[np.ndarray, float]:
    """Ancestral sampling (docs/method.md §7) with the exact oracle as the denoiser; returns (samples, NFE).

    Grid t_k = linspace(1, 0, steps + 1), alpha_t = 1 - t: at t -> s each masked token is revealed with
    probability (alpha_s - alpha_t) / (1 - alpha_t) and takes a value drawn from the oracle marginal at
    ``temperature`` (log-marginals / T, renormalised; Gumbel-max in float64). The last step reaches
    alpha = 1, so every token is revealed without a greedy tail. NFE is what a time-agnostic network
    would need: one evaluation per sample per step in which that sample had a token to reveal (the
    output is reused when nothing changed). The marginals themselves are kept exact incrementally by
    :func:`refresh_marginals`, which is only a speed-up.
    """
    if steps < 1 or temperature <= 0 or length < 2:
        raise ValueError(f"need steps >= 1, temperature > 0, length >= 2; got steps={steps}, "
                         f"temperature={temperature}, length={length}")
    S = chain.num_symbols
    gen = keyed_rng("synthetic.oracle_sample", seed, n, length, steps)
    z = torch.full((n, length), S, dtype=torch.long)
    # All rows start fully masked, so one row's marginals serve every row.
    logp = chain.oracle_log_marginals(z[:1], S).expand(n, -1, -1).clone()
    evaluations = 0
    ts = np.linspace(1.0, 0.0, steps + 1)
    for t, s in zip(ts[:-1], ts[1:]):
        p_reveal = ((1.0 - s) - (1.0 - t)) / t
        reveal = (z == S) & torch.from_numpy(gen.random((n, length)) < p_reveal)
        if not bool(reveal.any()):
            continue
        evaluations += int(reveal.any(1).sum())
        where = reveal.nonzero(as_tuple=True)
        gumbel = torch.from_numpy(-np.log(-np.log(gen.random((len(where[0]), S)))))
        z[where] = torch.argmax(logp[where] / temperature + gumbel, dim=-1)
        if s > 0.0 and isinstance(chain, MarkovChain2):
            refresh_marginals(chain, z, logp, reveal, chunk=chunk)
        elif s > 0.0:  # no locality to exploit (a long-range source): recompute the rows that changed
            rows = reveal.any(1).nonzero().flatten()
            logp[rows] = chain.oracle_log_marginals(z[rows], S, chunk=chunk)
    return z.numpy(), evaluations / max(n, 1)
