"""Writing the exact synthetic benchmark (``tools/prepare_synthetic.py``): a seeded source and its token shards.

``--source switching`` writes the second benchmark instead: a regime-switching order-1 chain whose hidden
regime persists ~1/``--switch-prob`` tokens, so dependencies span the sampler's stride
(:mod:`mcd_scale.eval.synthetic.switching`); chain.json then holds that source (read it with
:func:`mcd_scale.eval.synthetic.load_source`), and its expected NLL / entropy rate in the manifest are
Monte Carlo estimates of the exact NLL (no closed form).

Output (``--out``, default data/synthetic), in the layout of tools/prepare_data.py so the same loader
(:func:`mcd_scale.data.loader.open_prepared`) and trainer read it:
  chain.json                      the chain (spec + full tables; :meth:`MarkovChain2.load`)
  {train,val,heldout}/shard-%06d.tar   webdataset tars, key %010d (global id within the split),
                                       member ``ids.npy`` (uint16, [seq_len])
  manifest.json                   written last: vocab_size (= S), mask_id (= S), seq_len, dtype, seed,
                                  per split {dir, num_samples, shards: [{name, num_samples, bytes, sha256}]},
                                  and the chain's digest, entropy rate and expected NLL per token.
Every sample is drawn from a generator keyed by (seed, split, chunk), so output is byte-identical for
the same flags.
"""
from __future__ import annotations

import os
import time
from typing import Iterator, Sequence

import numpy as np

from mcd_scale.data.loader import TOKENS_FORMAT, TOKENS_FORMAT_VERSION
from mcd_scale.data.manifest import manifest_path, sha256_file, write_manifest
from mcd_scale.data.shards import write_shards
from mcd_scale.eval.metrics import mean_unigram_entropy
from mcd_scale.eval.synthetic.chain2 import MarkovChain2, oracle_ancestral_sample
from mcd_scale.eval.synthetic.switching import SwitchingChain
from mcd_scale.rng import key_to_seed

TOOL_VERSION = 1
CHUNK = 1024
"""Sequences drawn per keyed call: fixed, so the output does not depend on memory or batch choices."""


def split_samples(chain: MarkovChain2, split: str, count: int, seq_len: int, seed: int) -> Iterator[tuple[int, dict]]:
    """(global id, {"ids": uint16 [seq_len]}) for one split, ids 0..count-1, drawn chunk by chunk."""
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        rows = chain.sample(n, seq_len, seed=key_to_seed("synthetic.split." + split, seed, start))
        for j in range(n):
            yield start + j, {"ids": rows[j].astype(np.uint16)}


def prepare(out: str, num_symbols: int, branching: int, fanout: int, concentration: float, floor: float,
            seq_len: int, counts: dict[str, int], seed: int, samples_per_shard: int, source: str = "chain2",
            regimes: int = 4, switch_prob: float = 1.0 / 1024) -> dict:
    """Write chain.json, the shards of every split and manifest.json (last); returns the manifest.

    ``source``: 'chain2' (the sparse order-2 chain; branching, fanout) or 'switching' (regimes, switch_prob,
    fanout; branching unused)."""
    if num_symbols > np.iinfo(np.uint16).max:
        raise ValueError(f"--num-symbols {num_symbols} does not fit the uint16 shards")
    if seq_len < 2 or samples_per_shard < 1 or min(counts.values()) < 0:
        raise ValueError("need --seq-len >= 2, --samples-per-shard >= 1 and non-negative split sizes")
    if source == "chain2":
        chain = MarkovChain2(num_symbols, branching, seed=seed, fanout=fanout, concentration=concentration,
                             floor=floor)
        spec = {"branching": branching}
    elif source == "switching":
        chain = SwitchingChain(num_symbols, regimes, seed=seed, fanout=fanout, concentration=concentration,
                               switch_prob=switch_prob, floor=floor)
        spec = {"regimes": regimes, "switch_prob": switch_prob,
                "expected_nll_se": chain.expected_nll_se(seq_len), "estimates": "monte_carlo"}
    else:
        raise ValueError(f"--source {source!r} is not one of 'chain2', 'switching'")
    os.makedirs(out, exist_ok=True)
    for path in (manifest_path(out), manifest_path(out) + ".tmp"):  # a crash must not leave a stale one
        if os.path.exists(path):
            os.remove(path)
    chain_path = os.path.join(out, "chain.json")
    chain.save(chain_path)
    splits = {}
    for split, count in counts.items():
        split_dir = os.path.join(out, split)
        if os.path.isdir(split_dir):  # old shards of a larger run would otherwise linger
            for name in os.listdir(split_dir):
                if name.endswith(".tar"):
                    os.remove(os.path.join(split_dir, name))
        shards = write_shards(split_dir, split_samples(chain, split, count, seq_len, seed), samples_per_shard)
        splits[split] = {"dir": split, "num_samples": count, "shards": shards}
    manifest = {
        "format": TOKENS_FORMAT,
        "format_version": TOKENS_FORMAT_VERSION,
        "benchmark": "synthetic",
        "tool": "tools/prepare_synthetic.py",
        "tool_version": TOOL_VERSION,
        "vocab_size": num_symbols,
        "mask_id": num_symbols,
        "seq_len": seq_len,
        "dtype": "uint16",
        "seed": seed,
        "chain": {"path": "chain.json", "sha256": sha256_file(chain_path), "source": source, **spec,
                  "num_symbols": num_symbols, "fanout": fanout,
                  "concentration": concentration, "floor": floor,
                  "entropy_rate": chain.entropy_rate(), "expected_nll_per_token": chain.expected_nll(seq_len)},
        "splits": splits,
    }
    write_manifest(out, manifest)
    return manifest


def oracle_check(chain, n: int, seq_len: int, seed: int,
                 runs: Sequence[tuple[int, float]]) -> list[dict]:
    """True NLL and entropy of the exact oracle sampled at (steps, temperature): the benchmark's ceiling.

    Many steps should come close to ``expected_nll_per_token``; few steps fall short at equal entropy.
    """
    rows = []
    for steps, temperature in runs:
        start = time.perf_counter()
        x, nfe = oracle_ancestral_sample(chain, n, seq_len, steps, seed=seed, temperature=temperature)
        rows.append({"steps": steps, "temperature": temperature, "num_samples": n,
                     "true_nll": float(chain.nll(x).mean()), "entropy": mean_unigram_entropy(x), "nfe": nfe,
                     "seconds": time.perf_counter() - start})
        print(f"prepare_synthetic: oracle {rows[-1]}", flush=True)
    return rows
