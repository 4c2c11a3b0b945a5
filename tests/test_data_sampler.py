"""Global-batch sampler and micro-batch loader: exactly once per epoch, layout independence, resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mcd_scale.data.loader import MicroBatchLoader, eval_loader
from mcd_scale.data.sampler import GlobalBatchSampler, SamplerError
from mcd_scale.data.shards import ShardedDataset, write_shards

N, G, MB = 103, 8, 2  # N not a multiple of G: global batches straddle epoch boundaries


def _rank_union(sampler: GlobalBatchSampler, step: int, dp: int) -> list[tuple[int, int]]:
    """(position, id) pairs of all ranks at ``step``, in rank then micro-batch order."""
    out = []
    for rank in range(dp):
        ids = sampler.rank_slice(step, rank, dp, MB)
        pos = sampler.rank_positions(step, rank, dp, MB)
        assert len(ids) == G // (dp * MB) and all(len(m) == MB for m in ids)
        out += [(p, i) for mi, mp in zip(ids, pos) for i, p in zip(mi, mp)]
    return out


# (block, stripe): the default (one stripe holds all of N here), several stripes with a short last
# block (103 = 25 x 4 + 3), single-sample blocks, and stripes that do not divide the block count.
ORDERS = [{}, {"block": 4, "stripe": 3}, {"block": 1, "stripe": 5}, {"block": 7, "stripe": 2}]


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: "-".join(map(str, o.values())) or "default")
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_exactly_once_per_epoch_and_layout_independent(dp, order):
    sampler = GlobalBatchSampler(N, G, seed=7, **order)
    reference = GlobalBatchSampler(N, G, seed=7, **order)  # a fresh instance: no hidden state matters
    stream: list[int] = []
    steps = 3 * N // G + 2
    for step in range(steps):
        union = _rank_union(sampler, step, dp)
        # Ranks partition the global batch: positions 0..G-1 each once, ids as the global batch says.
        assert sorted(p for p, _ in union) == list(range(G))
        assert [i for _, i in sorted(union)] == reference.global_batch(step)
        stream += [i for _, i in sorted(union)]
    for epoch in range(3):
        assert sorted(stream[epoch * N:(epoch + 1) * N]) == list(range(N))
    # Epochs are reshuffled, and the seed matters.
    assert stream[:N] != stream[N:2 * N]
    assert GlobalBatchSampler(N, G, seed=8, **order).global_batch(0) != reference.global_batch(0)


@pytest.mark.parametrize("block,stripe", [(4, 3), (7, 2), (1, 5)])
def test_shuffle_buffer_is_bounded_to_a_stripe_of_blocks(block, stripe):
    """The epoch order is a sequence of stripes; each stripe is a permutation of ``stripe`` whole
    blocks of consecutive ids (what a bounded buffer of block x stripe samples can produce)."""
    sampler = GlobalBatchSampler(N, G, seed=5, block=block, stripe=stripe)
    for epoch in range(2):
        order = sampler.epoch_permutation(epoch).tolist()
        pos, blocks_seen = 0, set()
        while pos < N:
            # The stripe starting here spans the whole blocks its first ids belong to.
            ids, blocks = [], set()
            while pos < N and (len(blocks) < stripe or order[pos] // block in blocks):
                blocks.add(order[pos] // block)
                ids.append(order[pos])
                pos += 1
            want = sorted(g for b in blocks for g in range(b * block, min((b + 1) * block, N)))
            assert sorted(ids) == want, f"stripe at epoch {epoch} mixes partial blocks"
            assert not blocks & blocks_seen
            blocks_seen |= blocks
        # ... and the stripes still shuffle: not id order within every stripe.
        assert order != sorted(order)


def test_sampler_holds_nothing_of_size_n():
    """A corpus-sized sampler: the cached state is O(N / block + block x stripe), not O(N)."""
    n = 10**8
    sampler = GlobalBatchSampler(n, 64, seed=1)
    batch = sampler.global_batch(12_345_678)  # deep into epoch 7
    assert len(set(batch)) == 64 and all(0 <= g < n for g in batch)
    held = sum(a.nbytes for pair in sampler._epochs.values() for a in pair)
    held += sum(a.nbytes for a in sampler._stripes.values())
    assert held < 3 * 8 * n // sampler.block + 8 * 8 * sampler.block * sampler.stripe


def test_cursor_of_another_order_is_refused():
    s = GlobalBatchSampler(N, G, seed=1, block=4, stripe=3)
    s.advance(3)
    state = s.state_dict()
    old = {k: v for k, v in state.items() if k not in ("order", "block", "stripe")}  # the global-shuffle era
    with pytest.raises(SamplerError, match="order"):
        GlobalBatchSampler(N, G, seed=1, block=4, stripe=3).load_state_dict(old)
    with pytest.raises(SamplerError, match="stripe"):
        GlobalBatchSampler(N, G, seed=1, block=4, stripe=4).load_state_dict(state)
    fresh = GlobalBatchSampler(N, G, seed=1, block=4, stripe=3)
    fresh.load_state_dict(state)
    assert fresh.next_step == 3
    in_order = GlobalBatchSampler(N, G, seed=1, shuffle=False)  # id order has no shuffle to differ in
    in_order.load_state_dict({"consumed_samples": G, "seed": 1, "num_samples": N, "global_batch": G,
                              "shuffle": False})


def test_bad_layout_and_cursor_errors():
    s = GlobalBatchSampler(N, G, seed=1)
    with pytest.raises(SamplerError, match="not a multiple"):
        s.rank_slice(0, 0, 3, MB)
    s.advance(2)
    state = s.state_dict()
    assert state["consumed_samples"] == 2 * G
    with pytest.raises(SamplerError, match="seed"):
        GlobalBatchSampler(N, G, seed=2).load_state_dict(state)
    with pytest.raises(SamplerError, match="num_samples"):
        GlobalBatchSampler(N + 1, G, seed=1).load_state_dict(state)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 500, size=(N, 16)).astype(np.uint16)
    records = write_shards(str(d), ((i, {"ids": rows[i]}) for i in range(N)), samples_per_shard=20)
    return str(d), {"num_samples": N, "shards": records}, rows


def _take(loader, n):
    out = []
    for batch in loader:
        out.append((loader.step, loader.micro, batch))
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("order", [{}, {"block": 4, "stripe": 3}], ids=["default", "4-3"])
def test_loader_batches_resume_and_workers(shard_dir, order):
    path, manifest, rows = shard_dir
    ds = ShardedDataset(path, manifest=manifest)
    dp, rank = 2, 1
    accum = G // (dp * MB)
    sampler = GlobalBatchSampler(N, G, seed=3, **order)
    full = _take(MicroBatchLoader(ds, sampler, rank, dp, MB), 6 * accum)
    for step, micro, batch in full:
        want = sampler.rank_slice(step, rank, dp, MB)[micro]
        assert batch["sample_id"].tolist() == want
        assert batch["position"].tolist() == sampler.rank_positions(step, rank, dp, MB)[micro]
        assert batch["ids"].dtype == torch.int64 and batch["ids"].shape == (MB, 16)
        assert torch.equal(batch["ids"], torch.from_numpy(rows[want].astype(np.int64)))
    assert [s for s, _, _ in full] == [s for s in range(6) for _ in range(accum)]
    assert sampler.consumed_samples == 6 * G

    # Interrupted run: 3 steps, checkpoint the cursor, new objects, 3 more steps == uninterrupted.
    first = GlobalBatchSampler(N, G, seed=3, **order)
    _take(MicroBatchLoader(ds, first, rank, dp, MB), 3 * accum)
    state = first.state_dict()
    resumed = GlobalBatchSampler(N, G, seed=3, **order)
    resumed.load_state_dict(state)
    rest = _take(MicroBatchLoader(ds, resumed, rank, dp, MB), 3 * accum)
    assert [b["sample_id"].tolist() for _, _, b in rest] == [b["sample_id"].tolist() for _, _, b in full[3 * accum:]]

    # Two reader workers give the same batches in the same order.
    two = _take(MicroBatchLoader(ds, GlobalBatchSampler(N, G, seed=3, **order), rank, dp, MB, num_workers=2), 6 * accum)
    for (_, _, a), (_, _, b) in zip(full, two):
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["sample_id"], b["sample_id"])
    loader = MicroBatchLoader(ds, GlobalBatchSampler(N, G, seed=3, **order), rank, dp, MB, start_step=4)
    _take(loader, 1)
    assert loader.step == 4 and loader.last_wait_s > 0 and loader.total_wait_s >= loader.last_wait_s


def test_eval_set_same_on_every_layout(shard_dir):
    path, manifest, _ = shard_dir
    ds = ShardedDataset(path, manifest=manifest)
    seen = {}
    for dp in (1, 2, 4):
        ids = []
        for rank in range(dp):
            for batch in eval_loader(ds, num_batches=3, global_batch=G, dp_rank=rank, dp=dp, micro_batch=MB):
                ids += list(zip(batch["sample_id"].tolist(), batch["position"].tolist()))
        seen[dp] = sorted(ids)
    assert seen[1] == seen[2] == seen[4]
    assert sorted(i for i, _ in seen[1]) == list(range(3 * G))
    with pytest.raises(SamplerError, match="eval_batches"):
        eval_loader(ds, num_batches=100, global_batch=G, dp_rank=0, dp=1, micro_batch=MB)


def test_loader_counts_skipped_samples(shard_dir, tmp_path):
    _, _, rows = shard_dir
    records = write_shards(str(tmp_path), ((i, {"ids": rows[i]}) for i in range(N) if i != 5), samples_per_shard=50)
    ds = ShardedDataset(str(tmp_path), manifest={"num_samples": N, "shards": records}, skip_corrupt=True)
    sampler = GlobalBatchSampler(N, N - 3, seed=0, shuffle=False)  # one global batch holds id 5
    loader = MicroBatchLoader(ds, sampler, 0, 1, N - 3, max_steps=1)
    (batch,) = list(loader)
    assert loader.skipped == 1 and batch["num_skipped"] == 1
    assert 5 not in batch["sample_id"].tolist() and batch["ids"].shape[0] == N - 4
