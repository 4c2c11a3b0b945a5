"""Trajectory shards (offline MCD targets): the format, the reader, and the threshold regeneration.

``tools/precompute_trajectories.py`` writes, for round n of the distillation, one record per sample
of the token train split (key = global sample id, webdataset layout, see :mod:`mcd_scale.data.shards`):

    ids.npy        uint16/uint32 [L]   the clean tokens x (same dtype as the token shards)
    times.npy      float64 [2]         (t, s) of this sample for this round, s = t - dt
    topk_pos.npy   uint16/int32 [n]    positions masked at s (increasing)
    topk_ids.npy   uint16/int32 [n, k] the teacher's k most likely ids there (decreasing probability)
    topk_logp.npy  float16 [n, k]      their log-probabilities at temperature tau_n
    tail_logp.npy  float32 [n]         log of the mass outside the top-k (-inf when k = V)

The reveal thresholds u are NOT stored: they are a pure function of (manifest ``thresholds.seed``,
sample id, ``thresholds.form``, ``thresholds.K``, ``thresholds.round_idx``), see :func:`thresholds_for`.
``z_t = where(u < alpha_t, x, m)``, ``z_s = where(u < alpha_s, x, m)``; the positions masked in
``z_s`` are exactly ``topk_pos`` (:meth:`TrajectoryDataset.verify_batch` checks it).

:func:`open_trajectories` checks ``OUT/manifest.json`` against the distillation config and refuses a
mismatch naming the field; :class:`TrajectoryDataset` serves fixed-shape items so the default collate
(:func:`mcd_scale.data.loader.collate_samples`) stacks them.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from mcd_scale.data.manifest import (Expect, ManifestError, check_manifest, get_field, load_manifest,
                                     manifest_path)
from mcd_scale.data.shards import KEY_FORMAT, Sample, ShardedDataset, ShardError
from mcd_scale.diffusion.schedules import get_schedule
from mcd_scale.distill.checkpoints import teacher_digest
from mcd_scale.distill.reveal_order import ordered_thresholds
from mcd_scale.distill.rounds import round_dt, round_temperature
from mcd_scale.rng import keyed_uniform

TRAJ_FORMAT = "mcd_scale.trajectories"
TRAJ_FORMAT_VERSION = 1
TOOL = "tools/precompute_trajectories.py"
THRESHOLD_PURPOSE = "coupled"  # the keyed_generator purpose reveal_thresholds uses
TIME_PURPOSE = "traj-time"  # keyed_generator("traj-time", seed, round, sample_id) -> U(0,1) -> t
FIELDS = ("ids", "times", "topk_pos", "topk_ids", "topk_logp", "tail_logp")


def threshold_K(vocab_size: int) -> int:
    """The Gaussian dimension of the duality: the V real tokens plus the mask (docs/method.md §3)."""
    return vocab_size + 1


def sample_time(seed: int, round_idx: int, sample_id: int, t_min: float) -> float:
    """The raw time t in [t_min, 1] of one sample in one round (before :func:`coupled_times`)."""
    u = float(keyed_uniform(TIME_PURPOSE, (seed, round_idx, sample_id), (1,))[0])
    return t_min + (1.0 - t_min) * u


def thresholds_for(sample_ids: torch.Tensor | Sequence[int], manifest: Mapping[str, Any]) -> torch.Tensor:
    """Regenerate the reveal thresholds u (float64 [B, L]) of these samples from the manifest alone:
    ``reveal_thresholds(sample_ids, seq_len, thresholds.seed, thresholds.form, K=thresholds.K,
    round_idx=thresholds.round_idx)``, banded when ``thresholds.order`` is 'strided' (``thresholds.stride``;
    mcd_scale/distill/reveal_order.py). Identical on any rank, worker or batch composition."""
    # lazy: loads scipy; importing this module does not need it
    from mcd_scale.diffusion.duality import reveal_thresholds

    th = manifest["thresholds"]
    ids = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1)
    u = reveal_thresholds(ids, int(manifest["seq_len"]), int(th["seed"]), th["form"], K=th["K"],
                          round_idx=th["round_idx"])
    order = th.get("order", "random")  # written only for the strided order: earlier manifests stay valid
    if order == "random":
        return u
    return ordered_thresholds(u, ids, int(th["seed"]), int(th["round_idx"]), order, int(th["stride"]),
                              get_schedule(manifest["schedule"], manifest["eps"]))


def coupled_from_batch(batch: Mapping[str, Any], manifest: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, z_s) int64 [B, L] of a collated trajectory batch (``ids``, ``t``, ``s``, ``sample_id``)."""
    # lazy: loads scipy; importing this module does not need it
    from mcd_scale.diffusion.duality import coupled_pair

    u = thresholds_for(batch["sample_id"], manifest)
    schedule = get_schedule(manifest["schedule"], manifest["eps"])
    return coupled_pair(batch["ids"].long(), batch["t"].double(), batch["s"].double(), u, schedule,
                        int(manifest["mask_id"]))


def verify_batch(batch: Mapping[str, Any], manifest: Mapping[str, Any]) -> None:
    """Consistency check a consumer can run: the regenerated z_s masks exactly ``tk_mask``.

    Raises ValueError naming the first sample id whose regenerated mask differs (a wrong seed, form,
    round or schedule, or shards from another code version)."""
    _, z_s = coupled_from_batch(batch, manifest)
    regen = z_s == int(manifest["mask_id"])
    bad = (regen != batch["tk_mask"]).any(dim=1)
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0, 0])
        gid = int(batch["sample_id"][b])
        raise ValueError(f"trajectory sample key {KEY_FORMAT % gid}: the positions masked at s regenerated from "
                         f"the manifest's thresholds ({int(regen[b].sum())} masked) differ from the stored "
                         f"topk_pos ({int(batch['tk_mask'][b].sum())}); the shards were made with other "
                         f"thresholds/seed/schedule than the manifest says. Re-run {TOOL}.")


class TrajectoryDataset:
    """Trajectory samples by global id (through the per-shard indexes), items expanded to fixed shapes.

    ``dataset[g]`` -> ``{"ids": int64 [L], "t": float64 [], "s": float64 [], "tk_mask": bool [L],
    "tk_ids": int64 [L, k] (0 where unused), "tk_logp": float32 [L, k] (0 where unused),
    "tk_tail": float32 [L] (-inf where unused)}``, or ``None`` for a sample skipped under
    ``skip_corrupt`` (counted in ``.skipped``; collate_samples drops it and reports ``num_skipped``).
    Picklable and fork-safe (DataLoader workers open their own file handles).
    """

    def __init__(self, directory: str, manifest: Mapping[str, Any], skip_corrupt: bool = False) -> None:
        self.directory = directory
        self.manifest = dict(manifest)
        record = manifest["splits"]["train"]
        if record.get("shards") and "index" not in record["shards"][0]:
            raise ManifestError(f"{manifest_path(directory)} was written before shard indexes (no 'index' in "
                                f"its shard records); re-run {TOOL} into a new --out")
        self.split_dir = os.path.join(directory, record["dir"])
        self.shards = ShardedDataset(self.split_dir, manifest=record,
                                     skip_corrupt=skip_corrupt)
        self.seq_len = int(manifest["seq_len"])
        self.vocab_size = int(manifest["vocab_size"])
        self.k = int(manifest["top_k"])
        self._records = list(record["shards"])
        self._bad_items = 0

    def __len__(self) -> int:
        return len(self.shards)

    @property
    def skipped(self) -> int:
        return self.shards.skipped + self._bad_items

    @property
    def skip_corrupt(self) -> bool:
        return self.shards.skip_corrupt

    def shard_of(self, gid: int) -> str:
        """Path of the shard that holds sample ``gid`` (per the manifest)."""
        for rec in self._records:
            if int(rec["first_id"]) <= gid <= int(rec["last_id"]):
                return os.path.join(self.split_dir, rec["name"])
        return "<no shard>"

    def thresholds(self, sample_ids) -> torch.Tensor:
        return thresholds_for(sample_ids, self.manifest)

    def coupled_pair(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return coupled_from_batch(batch, self.manifest)

    def verify_batch(self, batch: Mapping[str, Any]) -> None:
        verify_batch(batch, self.manifest)

    def __getitem__(self, global_id: int) -> Optional[Sample]:
        gid = int(global_id)
        rec = self.shards[gid]
        if rec is None:
            return None
        try:
            return self._expand(rec)
        except ShardError:  # already names its shard (a ValueError too, as every input error)
            raise
        except (KeyError, ValueError, IndexError) as exc:
            msg = f"shard '{self.shard_of(gid)}': sample key {KEY_FORMAT % gid}: {exc}"
            if self.shards.skip_corrupt:
                self._bad_items += 1
                return None
            raise ShardError(msg + f". Re-create the shard with {TOOL}, or set data.skip_corrupt=true.") from None

    def _expand(self, rec: Mapping[str, np.ndarray]) -> Sample:
        L, k, V = self.seq_len, self.k, self.vocab_size
        missing = [f for f in FIELDS if f not in rec]
        if missing:
            raise KeyError(f"fields {missing} are missing (expected {list(FIELDS)})")
        ids, times = np.asarray(rec["ids"]), np.asarray(rec["times"])
        pos = np.asarray(rec["topk_pos"]).astype(np.int64)
        top_ids, top_logp, tail = (np.asarray(rec[f]) for f in ("topk_ids", "topk_logp", "tail_logp"))
        n = pos.shape[0] if pos.ndim == 1 else -1
        if ids.shape != (L,) or times.shape != (2,) or times.dtype != np.float64 or n < 0 \
                or top_ids.shape != (n, k) or top_logp.shape != (n, k) or tail.shape != (n,):
            raise ValueError(f"unexpected shapes: ids {ids.shape} (want ({L},)), times {times.shape} {times.dtype} "
                             f"(want (2,) float64), topk_pos {pos.shape}, topk_ids {top_ids.shape}, topk_logp "
                             f"{top_logp.shape} (want (n, {k})), tail_logp {tail.shape}")
        if n and (pos.min() < 0 or pos.max() >= L or np.any(np.diff(pos) <= 0)):
            raise ValueError(f"topk_pos must be increasing positions in [0, {L})")
        if ids.dtype.kind != "u" or (ids.size and int(ids.max()) >= V):
            raise ValueError(f"ids must be unsigned token ids below vocab_size {V} (got {ids.dtype}, "
                             f"max {int(ids.max()) if ids.size else None})")
        if top_ids.size and (int(top_ids.min()) < 0 or int(top_ids.max()) >= V):
            raise ValueError(f"topk_ids outside [0, {V})")
        tk_mask = np.zeros(L, dtype=bool)
        tk_mask[pos] = True
        tk_ids = np.zeros((L, k), dtype=np.int64)
        tk_ids[pos] = top_ids
        tk_logp = np.zeros((L, k), dtype=np.float32)
        tk_logp[pos] = top_logp.astype(np.float32)
        tk_tail = np.full(L, -np.inf, dtype=np.float32)
        tk_tail[pos] = tail.astype(np.float32)
        return {"ids": ids.astype(np.int64), "t": np.array(times[0], dtype=np.float64),
                "s": np.array(times[1], dtype=np.float64), "tk_mask": tk_mask, "tk_ids": tk_ids,
                "tk_logp": tk_logp, "tk_tail": tk_tail}

    def close(self) -> None:
        self.shards.close()


def expected_fields(cfg) -> dict[str, Expect]:
    """The manifest fields a distillation config pins, as :class:`Expect` entries (no file access)."""
    d, m, diff = cfg.distill, cfg.model, cfg.diffusion
    n = d.round
    redo = f"re-run {TOOL} with this config (--round {n}) into a new --out, or fix the config"
    return {
        "format": Expect(TRAJ_FORMAT, "the trajectory reader's format", f"point data.trajectories at {TOOL} output"),
        "format_version": Expect(TRAJ_FORMAT_VERSION, "this code's version", f"re-run {TOOL}"),
        "round": Expect(n, "distill.round", redo),
        "dt": Expect(round_dt(d, n), f"round_dt(distill, round={n}) (distill.dt0={d.dt0}, dt_growth={d.dt_growth})",
                     redo),
        "temperature": Expect(round_temperature(d, n), f"round_temperature(distill, round={n})", redo),
        "top_k": Expect(d.top_k, "distill.top_k", redo),
        "seed": Expect(cfg.train.seed, "train.seed (the objective regenerates the thresholds from it)", redo),
        "seq_len": Expect(m.seq_len, "model.seq_len", redo),
        "vocab_size": Expect(m.vocab_size, "model.vocab_size", redo),
        "mask_id": Expect(m.mask_id, "model.mask_id (= model.vocab_size)", redo),
        "schedule": Expect(diff.schedule, "diffusion.schedule", redo),
        "eps": Expect(diff.eps, "diffusion.eps", redo),
        "t_min": Expect(diff.t_min, "diffusion.t_min", redo),
        "duality_form": Expect(diff.duality_form, "diffusion.duality_form", redo),
    }


def open_trajectories(cfg, directory: Optional[str] = None) -> TrajectoryDataset:
    """Open ``cfg.data.trajectories`` after checking its manifest against the distillation config.

    Refuses (:class:`ManifestError` naming the manifest, the field, both values and the fix): another
    format/version, seed (train.seed), round, dt, temperature, top_k, seq_len, vocab_size, mask_id, schedule, eps, t_min
    or duality form than the config's; a teacher digest other than ``cfg.distill.teacher``'s (when
    set); a tokenizer other than the token data's at ``cfg.data.path`` (when that has a manifest).
    """
    directory = directory or cfg.data.trajectories
    if not directory:
        raise ManifestError("'data.trajectories' is empty: offline distillation needs trajectory shards "
                            f"(run {TOOL} --teacher ... --data {cfg.data.path} --out DIR, then set "
                            "data.trajectories=DIR)")
    manifest = load_manifest(directory, tool_hint=TOOL)
    source = manifest_path(directory)
    check_manifest(manifest, expected_fields(cfg), source)
    if cfg.distill.teacher:
        digest = teacher_digest(cfg.distill.teacher)
        check_manifest(manifest, {"teacher.sha256": Expect(
            digest, f"the sha256 of distill.teacher ({cfg.distill.teacher})",
            f"these shards come from another teacher; re-run {TOOL} --teacher {cfg.distill.teacher}")}, source)
    data_manifest = manifest_path(cfg.data.path) if cfg.data.path else ""
    tokens = load_manifest(cfg.data.path) if data_manifest and os.path.isfile(data_manifest) else {}
    if "tokenizer" in tokens:  # the synthetic benchmark's manifest has no tokenizer (its ids are symbols)
        tok = get_field(tokens, "tokenizer.sha256", data_manifest)
        check_manifest(manifest, {"source.tokenizer_sha256": Expect(
            tok, f"the tokenizer sha256 in {data_manifest} (data.path)",
            f"the shards were tokenized differently; re-run {TOOL} --data {cfg.data.path}")}, source)
    th = get_field(manifest, "thresholds", source)
    order, stride = th.get("order", "random"), int(th.get("stride", 0))
    want = (cfg.distill.reveal_order, cfg.distill.reveal_stride if cfg.distill.reveal_order == "strided" else 0)
    if (order, stride) != want:
        raise ManifestError(f"{source}: the shards reveal tokens in the {order!r} order (stride {stride}) but "
                            f"distill.reveal_order / reveal_stride say {want[0]!r} / {want[1]}; re-run {TOOL} with "
                            f"this config into a new --out, or match the config to the manifest")
    mode = get_field(manifest, "times", source).get("mode", "uniform")
    if mode != cfg.distill.times:
        raise ManifestError(f"{source}: the shards' (t, s) pairs are drawn {mode!r} (times.mode) but distill.times "
                            f"says {cfg.distill.times!r}; re-run {TOOL} with this config into a new --out, or match "
                            f"the config to the manifest")
    n = int(get_field(manifest, "num_samples", source))
    rec = get_field(manifest, "splits.train", source)
    if int(rec["num_samples"]) != n or sum(int(s["num_samples"]) for s in rec["shards"]) != n:
        raise ManifestError(f"{source}: num_samples {n} disagrees with the shard list; re-run {TOOL}")
    if not all(math.isfinite(float(manifest[f])) for f in ("dt", "temperature", "eps")):
        raise ManifestError(f"{source}: non-finite dt/temperature/eps")
    return TrajectoryDataset(directory, manifest, skip_corrupt=cfg.data.skip_corrupt)
