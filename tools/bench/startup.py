#!/usr/bin/env python
"""Loader start-up time and resident memory per rank against the corpus size. Prints one JSON object.

    python tools/bench/startup.py                                  # 10M samples, 1000 shards
    python tools/bench/startup.py --samples 1000000                # same shard count: flat in N?
    python tools/bench/startup.py --samples 2000 --shards 4 --seq-len 32 --dense   # CI size

In a temporary directory (removed at the end unless ``--keep``): token shards (the trainer's
``open_prepared`` format) and trajectory shards (``TrajectoryDataset``, offline MCD) of ``--samples``
samples each over ``--shards`` shards, with their per-shard index sidecars and manifests. Then, for
each data set, with 1 and 4 ranks (``--ranks``) and 0 and 2 reader workers (``--workers``): every
rank is a fresh process that opens the data set, builds the sampler and :class:`MicroBatchLoader` as
the trainer does and takes its first ``--steps`` steps of micro-batches. ``startup_s`` = from
"imports done" to the first micro-batch in hand; ``rss_mb`` = the rank's resident memory after
those steps (torch's import alone is ~250 MB of it: ``data_rss_mb`` is the growth from "imports
done"); ``worker_rss_mb`` = the largest reader worker (forked: shares the rank's pages, counted
again). All ranks of a case start together (they compete for the CPUs, as on a node).

Synthetic content, written fast: every sample has the same bytes except its key, so a shard is a
numpy template with the key digits and tar checksums filled in per row (``--dense``: every sample
written, byte-identical to what ``write_shards`` would write for that content). By default the
shards are *sparse* files of their full size in which only the samples the measured ranks will read
(the first ``--steps`` + 4 global batches of the sampler, prefetch included) are written: the data
path reads nothing else, and 10M trajectory samples would otherwise be ~100 GB of disk. The index
sidecars are always complete and real. The manifests' shard ``sha256`` is not computed (nothing on
the read path checks it; ``index_sha256`` is real and checked).

``resume_mid_shard`` compares, on one dense token shard of the same size per shard (at most 10000
samples), the time to the middle sample of the shard through ``webdataset.WebDataset`` (a stream
from the shard's first byte: what resuming a cursor costs there) with our indexed read.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

SEED = 1234
PREFETCH_STEPS = 4  # global batches written past the measured ones: workers prefetch up to 2 x 2 micro-batches


def _children() -> list[str]:
    """Pids of this process's children (the DataLoader's forked workers)."""
    out = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as fh:
            out += fh.read().split()
    return out


def _rss_mb(pid: str = "self") -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ----------------------------------------------------------------------------------------------
# Synthetic shards


def _token_fields(seq_len: int, vocab: int) -> dict[str, np.ndarray]:
    return {"ids": (np.arange(seq_len) % vocab).astype(np.uint16)}


def _trajectory_fields(seq_len: int, vocab: int, k: int) -> dict[str, np.ndarray]:
    n = seq_len // 2
    return {"ids": (np.arange(seq_len) % vocab).astype(np.uint16), "times": np.array([0.5, 0.4]),
            "topk_pos": np.arange(0, 2 * n, 2).astype(np.uint16),
            "topk_ids": np.tile(np.arange(k, dtype=np.uint16), (n, 1)),
            "topk_logp": np.full((n, k), -1.5, dtype=np.float16), "tail_logp": np.full(n, -3.0, dtype=np.float32)}


class _Template:
    """One sample's tar bytes (members in TarWriter's order) with the places that depend on the key."""

    def __init__(self, fields: dict[str, np.ndarray]) -> None:
        from mcd_scale.data.shards import KEY_FORMAT, encode_field

        key = KEY_FORMAT % 0
        members = sorted(encode_field(name, value) for name, value in fields.items())
        parts, self.headers, self.chk_base = [], [], []
        off = 0
        for suffix, payload in members:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            header = info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
            assert len(header) == 512
            # tarfile's checksum: 256 + every header byte but the 8 checksum bytes.
            self.chk_base.append(256 + sum(header[:148]) + sum(header[156:]) - sum(key.encode()))
            self.headers.append(off)
            pad = (-len(payload)) % 512
            parts += [header, payload, b"\0" * pad]
            off += 512 + len(payload) + pad
        self.bytes = np.frombuffer(b"".join(parts), dtype=np.uint8)
        self.size = off

    def rows(self, gids: np.ndarray) -> np.ndarray:
        """[len(gids), size] uint8: the samples ``gids`` as tar bytes."""
        out = np.tile(self.bytes, (len(gids), 1))
        digits = (gids[:, None] // 10 ** np.arange(9, -1, -1)[None, :]) % 10 + ord("0")
        for h, base in zip(self.headers, self.chk_base):
            out[:, h:h + 10] = digits
            chk = base + digits.sum(axis=1)
            out[:, h + 148:h + 154] = (chk[:, None] >> (3 * np.arange(5, -1, -1))[None, :]) % 8 + ord("0")
            out[:, h + 154] = 0
        return out


def write_synthetic(split_dir: str, fields: dict[str, np.ndarray], num_samples: int, num_shards: int,
                    wanted: "np.ndarray | None") -> list[dict]:
    """Shards ``shard-%06d.tar`` + index sidecars of ``num_samples`` samples; only ``wanted`` ids
    are written when given (the rest of each file is a hole). Returns the manifest's shard records."""
    from mcd_scale.data.shard_index import write_index

    os.makedirs(split_dir, exist_ok=True)
    tpl = _Template(fields)
    per = -(-num_samples // num_shards)
    records = []
    for j in range(num_shards):
        first, last = j * per, min((j + 1) * per, num_samples) - 1
        if first > last:
            break
        n = last - first + 1
        gids = np.arange(first, last + 1, dtype=np.int64)
        data_end = n * tpl.size
        size = data_end + 1024
        size += (-size) % tarfile.RECORDSIZE  # end-of-archive blocks, record padding: as tarfile writes
        path = os.path.join(split_dir, f"shard-{j:06d}.tar")
        with open(path, "wb") as fh:
            if wanted is None:
                for lo in range(0, n, 4096):
                    fh.write(tpl.rows(gids[lo:lo + 4096]).tobytes())
            else:
                mine = wanted[(wanted >= first) & (wanted <= last)]
                for g, row in zip(mine, tpl.rows(mine)):
                    os.pwrite(fh.fileno(), row.tobytes(), int(g - first) * tpl.size)
            fh.truncate(size)  # zeros after the data (end-of-archive); holes where nothing was written
        starts = (np.arange(n, dtype=np.int64) * tpl.size).tolist()
        index, index_sha = write_index(path, gids.tolist(), starts, data_end)
        records.append({"name": os.path.basename(path), "num_samples": n, "bytes": size,
                        "sha256": "not computed (tools/bench/startup.py)", "first_id": first, "last_id": last,
                        "index": index, "index_sha256": index_sha})
    return records


def make_data(root: str, a, wanted: "np.ndarray | None") -> dict[str, str]:
    from mcd_scale.data.loader import TOKENS_FORMAT, TOKENS_FORMAT_VERSION
    from mcd_scale.data.manifest import write_manifest
    from mcd_scale.data.trajectories import TRAJ_FORMAT, TRAJ_FORMAT_VERSION

    base = {"vocab_size": a.vocab, "mask_id": a.vocab, "seq_len": a.seq_len, "dtype": "uint16"}
    tokens = os.path.join(root, "tokens")
    shards = write_synthetic(os.path.join(tokens, "train"), _token_fields(a.seq_len, a.vocab), a.samples, a.shards,
                             wanted)
    write_manifest(tokens, {**base, "format": TOKENS_FORMAT, "format_version": TOKENS_FORMAT_VERSION,
                            "splits": {"train": {"dir": "train", "num_samples": a.samples, "shards": shards}}})
    traj = os.path.join(root, "trajectories")
    shards = write_synthetic(os.path.join(traj, "train"), _trajectory_fields(a.seq_len, a.vocab, a.top_k), a.samples,
                             a.shards, wanted)
    write_manifest(traj, {**base, "format": TRAJ_FORMAT, "format_version": TRAJ_FORMAT_VERSION, "top_k": a.top_k,
                          "splits": {"train": {"dir": "train", "num_samples": a.samples, "shards": shards}}})
    return {"tokens": tokens, "trajectories": traj}


def wanted_ids(a) -> np.ndarray:
    from mcd_scale.data.sampler import GlobalBatchSampler

    sampler = GlobalBatchSampler(a.samples, a.global_batch, SEED)
    return np.unique(np.array(sampler.ids_at(0, (a.steps + PREFETCH_STEPS) * a.global_batch), dtype=np.int64))


# ----------------------------------------------------------------------------------------------
# One rank (a child process)


def child(a) -> dict:
    t_imp = time.perf_counter()
    from mcd_scale.data.loader import MicroBatchLoader, open_prepared
    from mcd_scale.data.manifest import load_manifest
    from mcd_scale.data.sampler import GlobalBatchSampler
    from mcd_scale.data.trajectories import TrajectoryDataset

    import_s = time.perf_counter() - t_imp
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    if a.kind == "tokens":
        ds = open_prepared(a.path, "train", vocab_size=a.vocab, seq_len=a.seq_len)
    else:
        ds = TrajectoryDataset(a.path, load_manifest(a.path, "tools/bench/startup.py"))
    open_s = time.perf_counter() - t0
    sampler = GlobalBatchSampler(len(ds), a.global_batch, SEED)
    loader = MicroBatchLoader(ds, sampler, a.rank, a.dp, a.micro_batch, num_workers=a.workers)
    it = iter(loader)
    first = next(it)
    startup_s = time.perf_counter() - t0
    want = sampler.rank_slice(0, a.rank, a.dp, a.micro_batch)[0]
    if first["sample_id"].tolist() != want:
        raise SystemExit(f"rank {a.rank}: first micro-batch holds {first['sample_id'].tolist()}, sampler says {want}")
    for _ in range(a.steps * loader.grad_accum - 1):
        next(it)
    workers = _children()
    steps_s = time.perf_counter() - t0
    worker_rss = max((_rss_mb(str(p)) for p in workers), default=0.0)
    rss = _rss_mb()
    return {"rank": a.rank, "import_s": round(import_s, 3), "open_s": round(open_s, 4),
            "startup_s": round(startup_s, 4), "steps_s": round(steps_s, 4), "rss_mb": round(rss, 1),
            "data_rss_mb": round(rss - rss0, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "worker_rss_mb": round(worker_rss, 1), "workers_seen": len(workers)}


def run_case(a, kind: str, path: str, ranks: int, workers: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--kind", kind, "--path", path,
           "--dp", str(ranks), "--workers", str(workers)] + _shared_flags(a)
    procs = [subprocess.Popen(cmd + ["--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(ranks)]
    per_rank = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"{kind} ranks={ranks} workers={workers}: a rank exited {p.returncode}: {err[-2000:]}")
        per_rank.append(json.loads(out.strip().splitlines()[-1]))
    worst = {k: max(r[k] for r in per_rank) for k in ("startup_s", "open_s", "steps_s", "rss_mb", "data_rss_mb",
                                                       "peak_rss_mb", "worker_rss_mb", "import_s")}
    return {"data": kind, "ranks": ranks, "workers": workers, **worst,
            "workers_seen": min(r["workers_seen"] for r in per_rank)}


def _shared_flags(a) -> list[str]:
    return ["--samples", str(a.samples), "--seq-len", str(a.seq_len), "--vocab", str(a.vocab), "--top-k",
            str(a.top_k), "--global-batch", str(a.global_batch), "--micro-batch", str(a.micro_batch),
            "--steps", str(a.steps)]


# ----------------------------------------------------------------------------------------------
# webdataset vs the index: the cost of starting in the middle of a shard


def resume_mid_shard(root: str, a) -> dict:
    import webdataset

    from mcd_scale.data.shards import ShardedDataset

    n = min(-(-a.samples // a.shards), 10_000)
    d = os.path.join(root, "dense-one-shard")
    records = write_synthetic(d, _token_fields(a.seq_len, a.vocab), n, 1, None)
    mid = n // 2
    url = os.path.join(d, records[0]["name"])
    t0 = time.perf_counter()
    for s in webdataset.WebDataset([url], shardshuffle=False):
        if s["__key__"] == "%010d" % mid:
            break
    wds_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = ShardedDataset(d, manifest={"num_samples": n, "shards": records})[mid]
    ours_s = time.perf_counter() - t0
    if not np.array_equal(np.load(io.BytesIO(s["ids.npy"]), allow_pickle=False), ours["ids"]):
        raise RuntimeError("webdataset and the indexed reader disagree on the middle sample")
    return {"samples_per_shard": n, "sample": mid, "webdataset_s": round(wds_s, 4), "indexed_s": round(ours_s, 5)}


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--samples", type=int, default=10_000_000, help="samples per data set")
    ap.add_argument("--shards", type=int, default=1000, help="shards per data set (fixed: start-up flat in N)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--top-k", type=int, default=4, help="trajectory top-k")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="steps each rank takes after start-up")
    ap.add_argument("--ranks", default="1,4")
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--dense", action="store_true", help="write every sample (default: sparse shards, see above)")
    ap.add_argument("--dir", default=None, help="where the temporary directory goes (default: the system's)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data (path in the JSON)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dp", type=int, default=1, help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.child:
        a.workers = int(a.workers)
        print(json.dumps(child(a)), flush=True)
        return 0
    try:
        ranks = [int(x) for x in a.ranks.split(",")]
        workers = [int(x) for x in a.workers.split(",")]
    except ValueError:
        print(f"startup.py: --ranks/--workers take comma-separated integers (got {a.ranks!r}, {a.workers!r})",
              file=sys.stderr)
        return 2
    if a.samples < 1 or not 1 <= a.shards <= a.samples or a.seq_len < 2 or min(ranks) < 1 or min(workers) < 0 \
            or any(a.global_batch % (r * a.micro_batch) for r in ranks) or a.vocab > 65535:
        print("startup.py: need --samples >= --shards >= 1, --seq-len >= 2, --vocab <= 65535 and --global-batch a "
              "multiple of --micro-batch x every --ranks value", file=sys.stderr)
        return 2
    if a.dir is not None and not os.path.isdir(a.dir):
        print(f"startup.py: --dir {a.dir} is not a directory", file=sys.stderr)
        return 2
    root = tempfile.mkdtemp(prefix="mcd-startup-", dir=a.dir)
    try:
        t0 = time.perf_counter()
        wanted = None if a.dense else wanted_ids(a)
        paths = make_data(root, a, wanted)
        gen_s = time.perf_counter() - t0
        disk = int(subprocess.run(["du", "-sk", root], capture_output=True, text=True).stdout.split()[0]) * 1024
        index_bytes = sum(os.path.getsize(os.path.join(paths["tokens"], "train", n))
                          for n in os.listdir(os.path.join(paths["tokens"], "train")) if n.endswith(".idx.npy"))
        cases = [run_case(a, kind, paths[kind], r, w) for kind in ("tokens", "trajectories") for r in ranks
                 for w in workers]
        resume = resume_mid_shard(root, a)
        worst_t = max(c["startup_s"] for c in cases)
        worst_m = max(c["rss_mb"] for c in cases)
        out = {"bench": "startup", "samples": a.samples, "shards": a.shards,
               "samples_per_shard": -(-a.samples // a.shards), "seq_len": a.seq_len,
               "global_batch": a.global_batch, "micro_batch": a.micro_batch, "steps": a.steps,
               "shards_written": "dense" if a.dense else "sparse (only the samples read)",
               "generate_s": round(gen_s, 2), "disk_bytes": disk, "token_index_bytes": index_bytes,
               "cases": cases, "resume_mid_shard": resume,
               "worst_startup_s": worst_t, "worst_rss_mb": worst_m,
               "target": {"startup_s": 5.0, "rss_mb": 300.0},
               "target_met": worst_t < 5.0 and worst_m < 300.0,
               "cpu_count": os.cpu_count(), "data_dir": root if a.keep else None}
        print(json.dumps(out), flush=True)
    except RuntimeError as exc:
        print(f"startup.py: {exc}", file=sys.stderr)
        return 1
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
