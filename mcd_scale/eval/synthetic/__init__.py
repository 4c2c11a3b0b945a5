"""The exact synthetic benchmarks: sources whose true NLL and exact posterior are computable (docs/method.md §8).

- :mod:`.chain2`: a seeded sparse order-2 Markov chain (:class:`MarkovChain2`), its exact oracle denoiser and
  oracle sampler;
- :mod:`.switching`: a regime-switching chain whose dependencies span the strided sampler's stride
  (:class:`SwitchingChain`);
- :mod:`.common`: what both share (keyed generators, inverse-CDF draws, the file round trip);
- :mod:`.prepare`: the benchmark's token shards and manifest (``tools/prepare_synthetic.py``).
"""
from __future__ import annotations

import json

from mcd_scale.eval.synthetic import chain2, switching
from mcd_scale.eval.synthetic.chain2 import (ChainSpec, MarkovChain2, affected_windows, oracle_ancestral_sample,
                                             refresh_marginals)
from mcd_scale.eval.synthetic.switching import SwitchingChain, SwitchingSpec

FORMATS = {chain2.FORMAT: MarkovChain2, switching.FORMAT: SwitchingChain}
"""The ``format`` field of a saved source document -> its class."""

__all__ = ["ChainSpec", "MarkovChain2", "SwitchingChain", "SwitchingSpec", "affected_windows", "load_source",
           "oracle_ancestral_sample", "refresh_marginals", "FORMATS"]


def load_source(path: str):
    """The exact source saved at ``path``: a :class:`MarkovChain2` or a :class:`SwitchingChain`, by the document's
    ``format``. Both offer ``nll``, ``sample``, ``expected_nll``, ``entropy_rate``, ``oracle_log_marginals``,
    ``num_symbols``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        fmt = json.loads(text).get("format")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a synthetic source document ({exc})") from None
    if fmt not in FORMATS:
        raise ValueError(f"{path}: format {fmt!r} is not one of {list(FORMATS)} (write it with "
                         f"tools/prepare_synthetic.py)")
    return FORMATS[fmt].from_json(text)
