"""Shard writer/reader: deterministic bytes, random access, named errors, opt-in skipping."""
from __future__ import annotations

import glob
import os
import pickle

import numpy as np
import pytest
import webdataset

from mcd_scale.data.shards import ShardError, ShardedDataset, write_shards


def _samples(n: int, start: int = 0):
    for gid in range(start, start + n):
        yield gid, {"ids": np.arange(gid, gid + 6, dtype=np.uint16),
                    "logp": np.full((2, 3), -0.5 * gid, dtype=np.float32),
                    "meta": {"gid": gid, "note": "é"}}


def _manifest(records):
    return {"num_samples": sum(r["num_samples"] for r in records), "shards": records}


def _read_all_bytes(d):
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(d, "*.tar")))}


def test_write_is_deterministic_and_reads_back(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    rec_a = write_shards(str(a), _samples(11), samples_per_shard=4)
    rec_b = write_shards(str(b), _samples(11), samples_per_shard=4)
    assert [r["num_samples"] for r in rec_a] == [4, 4, 3]
    assert rec_a == rec_b and _read_all_bytes(a) == _read_all_bytes(b)
    assert not glob.glob(str(a / "*.tmp"))

    ds = ShardedDataset(str(a), manifest=_manifest(rec_a))
    assert len(ds) == 11
    for gid in (10, 0, 5, 4):  # random order: offsets, not a stream
        s = ds[gid]
        np.testing.assert_array_equal(s["ids"], np.arange(gid, gid + 6))
        assert s["ids"].dtype == np.uint16 and s["logp"].dtype == np.float32 and s["logp"].shape == (2, 3)
        assert s["meta"] == {"gid": gid, "note": "é"}
    with pytest.raises(IndexError):
        ds[11]
    # A pickled copy (what a spawned DataLoader worker gets) opens its own handles.
    ds2 = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(ds2[7]["ids"], ds[7]["ids"])


def test_webdataset_reads_our_shards(tmp_path):
    write_shards(str(tmp_path), _samples(7), samples_per_shard=3)
    urls = sorted(glob.glob(str(tmp_path / "*.tar")))
    got = list(webdataset.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in got] == ["%010d" % i for i in range(7)]
    for i, s in enumerate(got):
        np.testing.assert_array_equal(s["ids.npy"], np.arange(i, i + 6, dtype=np.uint16))
        assert s["ids.npy"].dtype == np.uint16
        assert s["meta.json"] == {"gid": i, "note": "é"}


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="strictly increasing"):
        write_shards(str(tmp_path), [(1, {"a": np.zeros(1)}), (1, {"a": np.zeros(1)})], 4)
    with pytest.raises(TypeError, match="pickle"):
        write_shards(str(tmp_path / "o"), [(0, {"a": np.array([object()])})], 4)
    with pytest.raises(ValueError, match="may not contain"):
        write_shards(str(tmp_path / "d"), [(0, {"a.b": np.zeros(1)})], 4)


def _truncate(path: str, keep: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(keep)


@pytest.mark.parametrize("with_manifest", [True, False])
def test_truncated_shard_names_shard_and_key(tmp_path, with_manifest):
    records = write_shards(str(tmp_path), _samples(8), samples_per_shard=4)
    shard1 = str(tmp_path / "shard-000001.tar")
    # Cut in the middle of sample 6's payload: samples 6 and 7 are lost.
    data = open(shard1, "rb").read()
    cut = data.index(b"0000000006.logp.npy") + 512 + 40
    _truncate(shard1, cut)
    manifest = _manifest(records) if with_manifest else None
    with pytest.raises(ShardError) as err:
        ShardedDataset(str(tmp_path), manifest=manifest)
    assert shard1 in str(err.value) and "0000000006" in str(err.value)

    if with_manifest:
        ds = ShardedDataset(str(tmp_path), manifest=manifest, skip_corrupt=True)
        assert len(ds) == 8 and ds.damaged and shard1 in ds.damaged[0]
        got = [ds[i] is None for i in range(8)]
        assert got == [False] * 6 + [True, True] and ds.skipped == 2
        np.testing.assert_array_equal(ds[5]["ids"], np.arange(5, 11))


def test_truncated_at_member_boundary_is_caught(tmp_path):
    """tarfile stops silently at a cut between members; the end-of-archive check catches it."""
    write_shards(str(tmp_path), _samples(4), samples_per_shard=4)
    path = str(tmp_path / "shard-000000.tar")
    data = open(path, "rb").read()
    _truncate(path, data.index(b"0000000003.ids.npy"))  # exactly at sample 3's first header
    with pytest.raises(ShardError, match="truncated") as err:
        ShardedDataset(str(tmp_path))
    assert path in str(err.value) and "0000000002" in str(err.value)


def test_corrupt_member_and_missing_key(tmp_path):
    records = write_shards(str(tmp_path), _samples(6), samples_per_shard=3)
    path = str(tmp_path / "shard-000001.tar")
    data = bytearray(open(path, "rb").read())
    at = data.index(b"\x93NUMPY", data.index(b"0000000004.ids.npy"))
    data[at:at + 6] = b"GARBAG"  # npy magic destroyed: undecodable
    open(path, "wb").write(bytes(data))
    ds = ShardedDataset(str(tmp_path), manifest=_manifest(records))
    with pytest.raises(ShardError) as err:
        ds[4]
    assert path in str(err.value) and "0000000004" in str(err.value) and "ids.npy" in str(err.value)
    np.testing.assert_array_equal(ds[3]["ids"], np.arange(3, 9))  # neighbours still fine

    skipping = ShardedDataset(str(tmp_path), manifest=_manifest(records), skip_corrupt=True)
    assert [skipping[i] is None for i in range(6)] == [False] * 4 + [True, False]
    assert skipping.skipped == 1

    # A gap in the ids (sample 1 never written) is a missing key, named with its shard.
    gap = tmp_path / "gap"
    write_shards(str(gap), ((g, f) for g, f in _samples(4) if g != 1), samples_per_shard=10)
    with pytest.raises(ShardError) as err:
        ShardedDataset(str(gap))
    assert "0000000001" in str(err.value) and "shard-000000.tar" in str(err.value)
    assert ShardedDataset(str(gap), skip_corrupt=True)[1] is None


def test_missing_shard_and_dir(tmp_path):
    records = write_shards(str(tmp_path), _samples(4), samples_per_shard=2)
    os.remove(tmp_path / "shard-000001.tar")
    with pytest.raises(ShardError, match="shard-000001.tar' is missing"):
        ShardedDataset(str(tmp_path), manifest=_manifest(records))
    with pytest.raises(ShardError, match="does not exist"):
        ShardedDataset(str(tmp_path / "nope"))


# -- the per-shard index (sidecar written with the shard, covered by the manifest, read lazily) --


def test_index_written_with_the_shard_and_read_lazily(tmp_path, monkeypatch):
    import mcd_scale.data.shards as shards_mod

    records = write_shards(str(tmp_path), _samples(10), samples_per_shard=2)
    for r in records:  # one sidecar per shard, named in its record with the digest the manifest keeps
        side = tmp_path / r["index"]
        assert side.is_file() and r["index"] == r["name"].replace(".tar", ".idx.npy")
        table = np.load(side)
        data = open(tmp_path / r["name"], "rb").read()
        # Row i is (id, offset of the sample's first header): the header there names that sample.
        for gid, off in table[:-1]:
            assert data[off:off + 10] == b"%010d" % gid
    ds = ShardedDataset(str(tmp_path), manifest=_manifest(records))
    assert ds._indexes == {}  # opening reads no index: start-up does not grow with the samples
    np.testing.assert_array_equal(ds[7]["ids"], np.arange(7, 13))
    assert list(ds._indexes) == [3]  # only the shard that was read
    # The cache is bounded: a long read touches every shard but keeps at most _CACHED_INDEXES.
    monkeypatch.setattr(shards_mod, "_CACHED_INDEXES", 2)
    for gid in range(10):
        assert ds[gid]["meta"]["gid"] == gid
        assert len(ds._indexes) <= 2
    # A worker gets the dataset without the parent's cached indexes (nothing big crosses the fork).
    assert pickle.loads(pickle.dumps(ds))._indexes == {}


def test_index_replaced_or_missing_is_named(tmp_path):
    records = write_shards(str(tmp_path), _samples(6), samples_per_shard=3)
    side = tmp_path / records[1]["index"]
    table = np.load(side)
    table[1, 1] += 512  # sample 4 now "starts" one header later: the digest must catch it
    np.save(side, table)
    ds = ShardedDataset(str(tmp_path), manifest=_manifest(records))
    np.testing.assert_array_equal(ds[0]["ids"], np.arange(0, 6))  # other shards unaffected
    with pytest.raises(ShardError, match=r"shard-000001\.tar.*shard-000001\.idx\.npy.*index_sha256"):
        ds[4]
    os.remove(side)
    with pytest.raises(ShardError, match=r"shard-000001\.tar.*shard-000001\.idx\.npy"):
        ShardedDataset(str(tmp_path), manifest=_manifest(records))[3]


def test_batch_read_returns_the_order_asked(tmp_path):
    records = write_shards(str(tmp_path), _samples(12), samples_per_shard=5)
    ds = ShardedDataset(str(tmp_path), manifest=_manifest(records))
    ask = [11, 0, 7, 3, 10, 1]
    got = ds.__getitems__(ask)
    assert [s["meta"]["gid"] for s in got] == ask
