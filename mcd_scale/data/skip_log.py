"""Name the samples that ``data.skip_corrupt`` dropped, so an opt-in skip is counted and never silent.

The data layer reads an unreadable sample as ``None`` and the collate function drops it (counting it in
``num_skipped``); the micro-batch then holds the ids that were kept. The ids this rank should have read at a step
are known from the sampler alone, so the skipped keys are the difference -- no change to the readers needed.
"""
from __future__ import annotations

from typing import Optional


def skipped_keys(micro_batches: list, expected: list) -> list[str]:
    """Shard keys (``KEY_FORMAT``) of ``expected`` ids (this rank's, per micro-batch) missing from ``micro_batches``."""
    # lazy: loads torch, webdataset; importing this module does not need them
    from mcd_scale.data.shards import KEY_FORMAT

    kept = {int(i) for mb in micro_batches for i in mb["sample_id"].tolist()}
    return [KEY_FORMAT % int(i) for ids in expected for i in ids if int(i) not in kept]


def report(rank: int, step: int, micro_batches: list, sampler, dp_rank: int, dp: int, micro_batch: int,
           total: int) -> Optional[list[str]]:
    """Print one line naming the skipped keys of this step on this rank (every rank that skipped speaks)."""
    if not sum(int(mb.get("num_skipped", 0)) for mb in micro_batches):
        return None
    keys = skipped_keys(micro_batches, sampler.rank_slice(step - 1, dp_rank, dp, micro_batch))
    print(f"[rank {rank}] step {step}: skipped {len(keys)} unreadable sample(s) under data.skip_corrupt "
          f"(keys {', '.join(keys)}; {total} on this rank so far)", flush=True)
    return keys
