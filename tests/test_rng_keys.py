"""Keyed random streams (mcd_scale/rng.py): distinct (purpose, ids) keys give distinct seeds, including keys
whose ids concatenate to the same digits ((1, 23) vs (12, 3)) or differ only in how many ids there are."""
from __future__ import annotations

import itertools

from mcd_scale.rng import key_to_seed


def test_distinct_keys_give_distinct_seeds():
    keys = [("coupled", ids) for n in (1, 2, 3) for ids in itertools.product([1, 2, 3, 12, 23, 123], repeat=n)]
    keys += [("coupled-sample", (1, 23)), ("coupled", (1, 23)), ("coupledsample", (1, 23))]
    seeds = {key_to_seed(purpose, *ids): (purpose, ids) for purpose, ids in keys}
    assert len(seeds) == len(set(keys)), "two different keys share a random stream"
    assert key_to_seed("coupled", 1, 23) != key_to_seed("coupled", 12, 3)
    assert key_to_seed("coupled", 1, 23) == key_to_seed("coupled", 1, 23)  # stable
