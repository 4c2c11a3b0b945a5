"""What the exact synthetic sources share: keyed numpy generators, inverse-CDF draws, the file round trip and the
symbol/mask ids."""
from __future__ import annotations

import numpy as np

from mcd_scale.rng import key_to_seed


def keyed_rng(purpose: str, *ids: int) -> np.random.Generator:
    """A numpy generator keyed by (purpose, ids): same numbers whatever ran before."""
    return np.random.default_rng(key_to_seed(purpose, *ids))


def inverse_cdf(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index i with cdf[i-1] < u <= cdf[i] (clipped: the last cdf entry may fall short of 1 by rounding)."""
    return np.minimum(np.searchsorted(cdf, u * cdf[-1], side="left"), len(cdf) - 1)


def inverse_cdf_rows(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Row-wise inverse CDF: cdf [n, K], u [n] -> index [n] (zero-probability slots are never chosen)."""
    idx = (cdf < (u * cdf[:, -1])[:, None]).sum(1)
    return np.minimum(idx, cdf.shape[1] - 1)


class SourceFile:
    """File round trip and the symbol/mask ids shared by the synthetic sources (``self.spec.num_symbols``;
    ``to_json``/``from_json`` are each source's own)."""

    @classmethod
    def load(cls, path: str):
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @property
    def num_symbols(self) -> int:
        return self.spec.num_symbols

    @property
    def mask_id(self) -> int:
        return self.spec.num_symbols
