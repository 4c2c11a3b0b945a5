"""A second exact benchmark whose dependencies span the sampler's stride: a regime-switching chain.

Why: on the order-2 chain (:mod:`mcd_scale.eval.synthetic.chain2`) every dependency is local,
so the strided reveal order (no two tokens closer than the stride revealed in one step) removes most of
the few-step loss without any distillation. Here a hidden regime h_l in {0..H-1} persists for ~1/rho
tokens (``switch_prob`` rho, default 1/1024, far longer than the demo's stride of 16) and selects which sparse
order-1 transition table emits the next symbol. Tokens revealed together at distance 16 still share their
regime with probability ~(1 - rho H/(H-1))^16 (0.98 at the defaults; 0.71 at rho = 1/64), and drawing them independently from
their marginals mixes regimes: a loss that only conditioning (more steps, or a student that learned the
joint) can remove, not the reveal order.

The source over S symbols, H regimes (an autoregressive HMM):
- h_0 uniform; h_l = h_{l-1} with probability 1 - rho, else uniform over the other H - 1 regimes;
- x_0 uniform over S; x_l | (h_l, x_{l-1} = b) ~ P_h(. | b) = (1 - S floor) probs[h, b, slot] + floor on
  the ``fanout`` candidates ``successors[h, b]`` (floor elsewhere): every sequence has a finite probability,
  so the exact posterior exists whatever a sampler revealed. Regime h's candidates all lie in its own
  block of the alphabet (S / H symbols), so a symbol reveals its regime.
Exact NLL: the forward algorithm over h (O(L H^2) per sequence). Exact posterior marginals given revealed
tokens: forward-backward over the joint state (h, x) (H S states, dense). No closed-form entropy rate:
:meth:`entropy_rate` and :meth:`expected_nll` are Monte Carlo estimates of the exact NLL (keyed draws,
standard error reported by :meth:`expected_nll_se`). Every draw comes from a keyed numpy generator.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from mcd_scale.eval.synthetic.common import SourceFile, inverse_cdf_rows, keyed_rng

FORMAT = "mcd_scale.synthetic.SwitchingChain"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SwitchingSpec:
    num_symbols: int = 64
    regimes: int = 4
    fanout: int = 4
    concentration: float = 1.0
    switch_prob: float = 1.0 / 1024
    floor: float = 1e-6
    seed: int = 0


class SwitchingChain(SourceFile):
    """Regime-switching sparse order-1 chain (module docstring): exact sampling, NLL and posteriors."""

    def __init__(self, num_symbols: int = 64, regimes: int = 4, seed: int = 0, fanout: int = 4,
                 concentration: float = 1.0, switch_prob: float = 1.0 / 1024, floor: float = 1e-6,
                 tables: tuple[np.ndarray, np.ndarray] | None = None):
        if num_symbols < 2 or regimes < 2:
            raise ValueError(f"need num_symbols >= 2 and regimes >= 2, got {num_symbols}, {regimes}")
        if not 1 <= fanout <= num_symbols // regimes:
            raise ValueError(f"need 1 <= fanout <= num_symbols // regimes (each regime's own block of symbols), got "
                             f"fanout={fanout}, num_symbols={num_symbols}, regimes={regimes}")
        if not (0.0 < floor and num_symbols * floor < 1.0):
            raise ValueError(f"floor must be in (0, 1/num_symbols), got {floor}")
        if not 0.0 < switch_prob <= 1.0:
            raise ValueError(f"switch_prob must be in (0, 1], got {switch_prob}")
        if concentration <= 0:
            raise ValueError(f"concentration must be positive, got {concentration}")
        self.spec = SwitchingSpec(num_symbols, regimes, fanout, float(concentration), float(switch_prob),
                                  float(floor), int(seed))
        if tables is None:
            tables = self._draw_tables(self.spec)
        self.successors = np.asarray(tables[0], dtype=np.int64)           # [H, S, F]
        self.probs = np.asarray(tables[1], dtype=np.float64)              # [H, S, F]
        H, S, F = regimes, num_symbols, fanout
        if self.successors.shape != (H, S, F) or self.probs.shape != (H, S, F):
            raise ValueError(f"tables have shapes {self.successors.shape}, {self.probs.shape}; expected {(H, S, F)}")
        if self.successors.min() < 0 or self.successors.max() >= S:
            raise ValueError("successors must be symbol ids in [0, num_symbols)")
        if (self.probs < 0).any() or not np.allclose(self.probs.sum(-1), 1.0, atol=1e-9):
            raise ValueError("probs[h, b, :] must be a probability vector")
        # Dense emission tables E[h, b, c] = P_h(c | b) (leak included) and the regime kernel A[h, h'].
        emit = np.full((H, S, S), floor)
        for h in range(H):
            np.add.at(emit[h], (np.arange(S)[:, None], self.successors[h]), (1.0 - S * floor) * self.probs[h])
        self.emission = emit
        rho = self.spec.switch_prob
        self.regime_kernel = np.full((H, H), rho / (H - 1)) + np.eye(H) * (1.0 - rho - rho / (H - 1))

    @staticmethod
    def _draw_tables(spec: SwitchingSpec) -> tuple[np.ndarray, np.ndarray]:
        """Regime h emits only from its own block of the alphabet (np.array_split of 0..S-1 into H blocks):
        one symbol identifies its regime, so two far-apart tokens drawn independently in one step can
        disagree on it, and the sequence must then pay a regime switch (~log(rho / (H - 1))) between them."""
        H, S, F = spec.regimes, spec.num_symbols, spec.fanout
        blocks = np.array_split(np.arange(S), H)
        gen = keyed_rng("synthetic.switching", spec.seed, H, S, F)
        successors = np.stack([np.stack([gen.permutation(blocks[h])[:F] for _ in range(S)]) for h in range(H)])
        probs = gen.dirichlet(np.full(F, spec.concentration), size=(H, S))
        return successors, probs

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **asdict(self.spec),
                           "successors": self.successors.tolist(), "probs": self.probs.tolist()})

    @classmethod
    def from_json(cls, text: str) -> "SwitchingChain":
        try:
            doc: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"source JSON does not parse: {exc}") from exc
        if doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} document (format={doc.get('format')!r})")
        try:
            return cls(num_symbols=doc["num_symbols"], regimes=doc["regimes"], seed=doc["seed"],
                       fanout=doc["fanout"], concentration=doc["concentration"], switch_prob=doc["switch_prob"],
                       floor=doc["floor"], tables=(np.array(doc["successors"]), np.array(doc["probs"])))
        except KeyError as exc:
            raise ValueError(f"source JSON lacks field {exc}") from exc

    # ------------------------------------------------------------------ exact probabilities
    def _check_ids(self, seqs: np.ndarray) -> np.ndarray:
        seqs = np.asarray(seqs)
        if seqs.ndim != 2 or seqs.shape[1] < 2:
            raise ValueError(f"seqs must be [n, L] with L >= 2, got shape {seqs.shape}")
        if seqs.size and (seqs.min() < 0 or seqs.max() >= self.num_symbols):
            raise ValueError(f"seqs contains ids outside [0, {self.num_symbols}) (range {seqs.min()}.."
                             f"{seqs.max()}); masks must be filled before scoring")
        return seqs.astype(np.int64)

    def log_prob(self, seqs: np.ndarray) -> np.ndarray:
        """Exact log p(x) (nats), float64 [n]: the forward algorithm over the regime, rescaled each step."""
        x = self._check_ids(seqs)
        n, L = x.shape
        H, S = self.spec.regimes, self.num_symbols
        alpha = np.full((n, H), 1.0 / H)
        logp = np.full(n, -np.log(S))                                   # x_0 uniform, independent of h_0
        for pos in range(1, L):
            alpha = alpha @ self.regime_kernel
            alpha = alpha * self.emission[:, x[:, pos - 1], x[:, pos]].T   # [n, H]
            norm = alpha.sum(1)
            logp += np.log(norm)
            alpha /= norm[:, None]
        return logp

    def nll(self, seqs: np.ndarray) -> np.ndarray:
        """Exact NLL per token (nats, averaged over the L tokens of each sequence), float64 [n]."""
        x = self._check_ids(seqs)
        return -self.log_prob(x) / x.shape[1]

    def sample(self, n: int, length: int, seed: int) -> np.ndarray:
        """n exact samples of length L (int64 [n, L]), keyed by (seed, n, length)."""
        if n < 0 or length < 2:
            raise ValueError(f"need n >= 0 and length >= 2, got n={n}, length={length}")
        H, S = self.spec.regimes, self.num_symbols
        gen = keyed_rng("synthetic.switching.sample", seed, n, length)
        out = np.empty((n, length), dtype=np.int64)
        h = gen.integers(0, H, n)
        out[:, 0] = gen.integers(0, S, n)
        cum = np.cumsum(self.emission, axis=-1)                           # [H, S, S]
        for pos in range(1, length):
            switch = gen.random(n) < self.spec.switch_prob
            other = (h + 1 + gen.integers(0, H - 1, n)) % H               # uniform over the other regimes
            h = np.where(switch, other, h)
            out[:, pos] = inverse_cdf_rows(cum[h, out[:, pos - 1]], gen.random(n))
        return out

    def _mc_nll(self, length: int, n: int, seed: int) -> np.ndarray:
        return self.nll(self.sample(n, length, seed=seed))

    def expected_nll(self, length: int, n: int = 1024, seed: int = 0) -> float:
        """Monte Carlo estimate of E[nll(x)] for a length-L sample (exact NLL of n keyed samples)."""
        return float(self._mc_nll(length, n, seed).mean())

    def expected_nll_se(self, length: int, n: int = 1024, seed: int = 0) -> float:
        """Standard error of :meth:`expected_nll` with the same arguments."""
        v = self._mc_nll(length, n, seed)
        return float(v.std(ddof=1) / np.sqrt(len(v)))

    def entropy_rate(self, n: int = 256, length: int = 1024, seed: int = 0) -> float:
        """Monte Carlo estimate of the per-token entropy rate: E[-log p(x_{L/2..L} | x_{<L/2})] / (L/2)."""
        x = self.sample(n, length, seed=seed)
        half = length // 2
        return float(((self.log_prob(x[:, :half]) - self.log_prob(x)) / (length - half)).mean())

    # ------------------------------------------------------------------ the exact oracle denoiser
    def joint_transition(self) -> torch.Tensor:
        """The chain over the joint state (h, x) (index h S + x), float64 [H S, H S]:
        M[(h, b), (h', c)] = A[h, h'] P_{h'}(c | b). Its forward messages serve the oracle marginals and the
        exact posterior draws (mcd_scale/eval/chain_posterior.py)."""
        H, S = self.spec.regimes, self.num_symbols
        A = torch.from_numpy(self.regime_kernel)
        E = torch.from_numpy(self.emission)                               # [h', b, c]
        M = A[:, None, :, None] * E.permute(1, 0, 2).unsqueeze(0)           # [h, b, h', c]
        return M.reshape(H * S, H * S)

    def joint_forward(self, z: torch.Tensor, mask_id: int, M: torch.Tensor):
        """(ev, alphas) of rows z [B, L]: ev [B, L, H S] the evidence on (h, x) (1 where x_l agrees with z or is
        masked), and a generator of the normalised forward messages alpha_l [B, H S], l = 0..L-1 (h_0, x_0
        uniform and independent), M = :meth:`joint_transition`. Shared by the oracle marginals and the exact
        posterior draws (mcd_scale/eval/chain_posterior.py)."""
        B, L = z.shape
        H, S = self.spec.regimes, self.num_symbols
        ev = torch.ones(B, L, S, dtype=torch.float64)
        rv = z != mask_id
        ev[rv] = torch.nn.functional.one_hot(z[rv], S).to(torch.float64)
        ev = ev.unsqueeze(2).expand(B, L, H, S).reshape(B, L, H * S)

        def alphas():
            alpha = ev[:, 0] / ev[:, 0].sum(1, keepdim=True)
            yield alpha
            for pos in range(1, L):
                alpha = (alpha @ M) * ev[:, pos]
                alpha = alpha / alpha.sum(1, keepdim=True)
                yield alpha

        return ev, alphas()

    def oracle_log_marginals(self, z: torch.Tensor, mask_id: int | None = None, chunk: int = 64) -> torch.Tensor:
        """Exact log P(x_l = v | revealed tokens of z), float64 [B, L, S]; revealed positions are a point
        mass. Forward-backward over the joint state (h, x_l): H S states, transition
        M[(h, b), (h', c)] = A[h, h'] P_{h'}(c | b)."""
        mask_id = self.mask_id if mask_id is None else int(mask_id)
        if z.dim() != 2 or z.shape[1] < 2:
            raise ValueError(f"z must be [B, L] with L >= 2, got shape {tuple(z.shape)}")
        revealed = z != mask_id
        if bool(((z < 0) | (z >= self.num_symbols))[revealed].any()):
            raise ValueError(f"z holds ids that are neither symbols in [0, {self.num_symbols}) nor the mask "
                             f"id {mask_id}")
        H, S = self.spec.regimes, self.num_symbols
        M = self.joint_transition()
        out = []
        for i in range(0, z.shape[0], chunk):
            zc = z[i:i + chunk]
            B, L = zc.shape
            ev, alphas = self.joint_forward(zc, mask_id, M)               # evidence on (h, x), forward messages
            betas = [torch.ones(B, H * S, dtype=torch.float64)]
            for pos in range(L - 1, 0, -1):                               # beta_{pos-1} from beta_pos
                b = (betas[-1] * ev[:, pos]) @ M.T
                betas.append(b / b.sum(1, keepdim=True))
            betas.reverse()
            marg = torch.empty(B, L, S, dtype=torch.float64)
            for pos, alpha in enumerate(alphas):
                post = (alpha * betas[pos]).view(B, H, S).sum(1)
                marg[:, pos] = post / post.sum(1, keepdim=True)
            out.append(torch.log(marg))
        return torch.cat(out, 0) if out else torch.empty(0, z.shape[1], S, dtype=torch.float64)
