"""This rank's micro-batches, step after step: shards + sampler + (optional) reader workers.

:class:`MicroBatchLoader` turns ``GlobalBatchSampler.rank_slice(step, ...)`` into stacked tensors
through a torch ``DataLoader`` whose ``batch_sampler`` is the step stream, so 0, 1 or 2 workers give
the same batches in the same order (DataLoader returns worker results in sampler order). It times
how long the trainer waits for each batch, so the trainer can log the data-wait share of a step.

:func:`open_prepared` is the trainer's entry to ``tools/prepare_data.py`` output: it loads the
manifest, refuses a mismatch with the model config, and opens one split.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mcd_scale.data.manifest import Expect, ManifestError, check_manifest, load_manifest, manifest_path
from mcd_scale.data.sampler import GlobalBatchSampler, SamplerError
from mcd_scale.data.shards import Sample, ShardError, ShardedDataset

TOKENS_FORMAT = "mcd_scale.tokens"
TOKENS_FORMAT_VERSION = 1
SPLITS = ("train", "val", "heldout")

Item = tuple[int, int, Optional[Sample]]  # (global sample id, position in the global batch, fields)
Collate = Callable[[list[Item]], dict[str, Any]]


def open_prepared(path: str, split: str, *, vocab_size: Optional[int] = None, seq_len: Optional[int] = None,
                  skip_corrupt: bool = False) -> ShardedDataset:
    """Open ``split`` ("train", "val" or "heldout") of a prepared token directory.

    ``vocab_size`` / ``seq_len`` (from ``cfg.model``) are checked against the manifest; a mismatch
    raises :class:`ManifestError` naming the file, both values and the prepare_data flag to fix it.
    """
    manifest = load_manifest(path)
    source = manifest_path(path)
    redo = "re-run tools/prepare_data.py with {flag} {value} or fix the config"
    expected: dict[str, Any] = {"format": TOKENS_FORMAT,
                                "format_version": Expect(TOKENS_FORMAT_VERSION, "this code's version",
                                                         "re-run tools/prepare_data.py")}
    if vocab_size is not None:
        expected["vocab_size"] = Expect(vocab_size, "model.vocab_size",
                                        redo.format(flag="--vocab-size", value=vocab_size))
        expected["mask_id"] = Expect(vocab_size, "model.mask_id (= model.vocab_size)", "re-run tools/prepare_data.py")
    if seq_len is not None:
        expected["seq_len"] = Expect(seq_len, "model.seq_len", redo.format(flag="--seq-len", value=seq_len))
    check_manifest(manifest, expected, source)
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ManifestError(f"{source} has no split '{split}' (it has: {', '.join(sorted(splits))})")
    record = splits[split]
    if split == "train" and (not record.get("shards") or int(record.get("num_samples", 0)) < 1):
        # Caught here, naming the file: later the sampler would only say "num_samples must be >= 1".
        raise ManifestError(f"{source}: split 'train' is empty (no shards or 0 samples); re-run "
                            f"tools/prepare_data.py --out {path} with some input text")
    if record.get("shards") and "index" not in record["shards"][0]:
        raise ManifestError(f"{source} was written before shard indexes (no 'index' in its shard records); "
                            f"re-run tools/prepare_data.py --out {path}")
    return ShardedDataset(os.path.join(path, record["dir"]), manifest=record, skip_corrupt=skip_corrupt,
                          validate=TokenCheck(int(manifest["vocab_size"]), int(manifest["seq_len"])))


class TokenCheck:
    """Rejects a token sample whose ``ids`` is not an unsigned-int [seq_len] array below vocab_size
    (picklable: DataLoader workers run it)."""

    def __init__(self, vocab_size: int, seq_len: int) -> None:
        self.vocab_size, self.seq_len = vocab_size, seq_len

    def __call__(self, sample: Sample) -> Optional[str]:
        ids = sample.get("ids")
        if not isinstance(ids, np.ndarray) or ids.dtype.kind != "u" or ids.shape != (self.seq_len,):
            got = f"{ids.dtype} {ids.shape}" if isinstance(ids, np.ndarray) else type(ids).__name__
            return f"ids is {got}, want an unsigned int array of shape ({self.seq_len},) (the manifest's seq_len)"
        if ids.size and int(ids.max()) >= self.vocab_size:
            return f"token id {int(ids.max())} >= vocab_size {self.vocab_size}"
        return None


def _to_tensor(name: str, arrays: Sequence[np.ndarray]) -> torch.Tensor:
    stacked = np.stack(arrays)
    if stacked.dtype.kind == "u" or name == "ids":
        # torch has little support for uint16/uint32; token ids are indices: int64.
        stacked = stacked.astype(np.int64)
    return torch.from_numpy(stacked)


def collate_samples(items: list[Item]) -> dict[str, Any]:
    """Stack items into ``{"ids": int64 [B, L], "sample_id": int64 [B], "position": int64 [B], ...}``.

    Array fields are stacked (unsigned ints widened to int64), dict fields become lists. Items that
    read as ``None`` (skipped under ``skip_corrupt``) are dropped and counted in ``num_skipped``. Items read
    with a stand-in for an unreadable sample (:class:`ReadItems`) add ``bad_input``: the reader's error line.
    """
    kept = [it for it in items if it[2] is not None]
    batch: dict[str, Any] = {
        "sample_id": torch.tensor([it[0] for it in kept], dtype=torch.int64),
        "position": torch.tensor([it[1] for it in kept], dtype=torch.int64),
        "num_skipped": len(items) - len(kept),
    }
    if getattr(items, "bad_input", None):
        batch["bad_input"] = items.bad_input
    if kept:
        for name, value in kept[0][2].items():
            values = [it[2][name] for it in kept]
            batch[name] = _to_tensor(name, values) if isinstance(value, np.ndarray) else values
    return batch


class ReadItems(list):
    """One micro-batch's items; ``bad_input`` is the error line of a sample a stand-in replaced (else None)."""

    bad_input: Optional[str] = None


class _Items(Dataset):
    """Map-style view: key (global id, position) -> (global id, position, fields).

    ``stand_in`` (the trainer's loaders; strict mode, no ``skip_corrupt``): an unreadable sample does not raise
    here. Its peers would by then be in the step's gradient reduction and fail there with the backend's error,
    not the named one. The next readable sample of the split stands in (same fields and shapes, under its own
    id, so anything keyed by the id still agrees with its data), and the error line travels with the micro-batch
    (``bad_input``) to the step that consumes it, whatever the reader workers prefetched: that step runs its
    collectives as usual, the flag rides on its one collective and every rank stops with the line before the
    optimizer update (mcd_scale/data/bad_input.py). Without it (tools, benches) the reader's error is raised as is.
    """

    def __init__(self, dataset: ShardedDataset, stand_in: bool = False) -> None:
        self.dataset, self.stand_in = dataset, stand_in

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        gid, pos = key
        return gid, pos, self.dataset[gid]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Item]:
        # One micro-batch at a time, read in file order (forward within each shard's block).
        many = getattr(self.dataset, "__getitems__", None)
        try:
            if many is None:
                return ReadItems(self[key] for key in keys)
            samples = many([gid for gid, _ in keys])
        except ShardError:
            if not self.stand_in:
                raise
            return self._with_stand_ins(keys)
        return ReadItems((gid, pos, sample) for (gid, pos), sample in zip(keys, samples))

    def _with_stand_ins(self, keys: list[tuple[int, int]]) -> ReadItems:
        items = ReadItems()
        for gid, pos in keys:
            try:
                items.append(self[(gid, pos)])
            except ShardError as exc:
                items.bad_input = items.bad_input or " ".join(str(exc).split())
                items.append(self._stand_in(gid, pos, exc))
        return items

    def _stand_in(self, gid: int, pos: int, error: ShardError) -> Item:
        n = len(self.dataset)
        for k in range(1, n):
            other = (gid + k) % n
            try:
                return other, pos, self.dataset[other]
            except ShardError:
                continue
        raise error  # no readable sample in the whole split: nothing can stand in


class _StepStream(Sampler):
    """Yields this rank's micro-batches as lists of (global id, position), step after step."""

    def __init__(self, sampler: GlobalBatchSampler, dp_rank: int, dp: int, micro_batch: int,
                 start_step: int, stop_step: Optional[int]) -> None:
        self.sampler, self.dp_rank, self.dp, self.micro_batch = sampler, dp_rank, dp, micro_batch
        self.start_step, self.stop_step = start_step, stop_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.stop_step is None or step < self.stop_step:
            ids = self.sampler.global_batch(step)
            for positions in self.sampler.rank_positions(step, self.dp_rank, self.dp, self.micro_batch):
                yield [(ids[p], p) for p in positions]
            step += 1

    def __len__(self) -> int:
        if self.stop_step is None:
            raise TypeError("the training stream is endless")
        accum = self.sampler.grad_accum(self.dp, self.micro_batch)
        return (self.stop_step - self.start_step) * accum


class MicroBatchLoader:
    """Iterate this data-parallel rank's micro-batches from ``start_step`` on.

    Each step yields ``grad_accum = global_batch / (dp * micro_batch)`` batches; after the last one
    of a step the sampler's cursor advances (so ``sampler.state_dict()`` taken between steps resumes
    exactly there). ``start_step=None`` starts at the sampler's cursor. ``max_steps`` bounds the
    stream (evaluation); otherwise it is endless.

    After each batch: ``step`` and ``micro`` (its index within the step), ``last_wait_s`` (seconds the
    caller waited for it), ``total_wait_s``, and ``skipped`` (samples dropped under skip_corrupt).
    ``stand_in``: an unreadable sample is replaced and its error line carried in the batch's ``bad_input``
    (:class:`_Items`), for a caller that stops every rank on it (the trainer); otherwise it raises.
    """

    def __init__(self, dataset: ShardedDataset, sampler: GlobalBatchSampler, dp_rank: int, dp: int,
                 micro_batch: int, start_step: Optional[int] = None, num_workers: int = 0,
                 collate: Collate = collate_samples, max_steps: Optional[int] = None,
                 prefetch_factor: int = 2, stand_in: bool = False) -> None:
        if len(dataset) != sampler.num_samples:
            raise SamplerError(f"sampler is over {sampler.num_samples} samples but the dataset has {len(dataset)}")
        self.dataset, self.sampler = dataset, sampler
        self.dp_rank, self.dp, self.micro_batch = dp_rank, dp, micro_batch
        self.grad_accum = sampler.grad_accum(dp, micro_batch)
        self.start_step, self.max_steps = start_step, max_steps
        self.num_workers, self.collate, self.prefetch_factor = num_workers, collate, prefetch_factor
        self.stand_in = stand_in
        self.step = -1
        self.micro = -1
        self.last_wait_s = 0.0
        self.total_wait_s = 0.0
        self.skipped = 0

    def _data_loader(self, start: int) -> DataLoader:
        stop = None if self.max_steps is None else start + self.max_steps
        stream = _StepStream(self.sampler, self.dp_rank, self.dp, self.micro_batch, start, stop)
        extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
        return DataLoader(_Items(self.dataset, self.stand_in), batch_sampler=stream, num_workers=self.num_workers,
                          collate_fn=self.collate, **extra)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = self.sampler.next_step if self.start_step is None else self.start_step
        index = 0
        it = iter(self._data_loader(start))
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.last_wait_s = time.perf_counter() - t0
            self.total_wait_s += self.last_wait_s
            self.skipped += int(batch.get("num_skipped", 0))
            step_offset, self.micro = divmod(index, self.grad_accum)
            self.step = start + step_offset
            index += 1
            if self.micro == self.grad_accum - 1:
                self.sampler.consumed_samples = (self.step + 1) * self.sampler.global_batch_size
            yield batch


def eval_loader(dataset: ShardedDataset, num_batches: int, global_batch: int, dp_rank: int, dp: int,
                micro_batch: int, num_workers: int = 0, stand_in: bool = False) -> MicroBatchLoader:
    """The fixed evaluation set: the first ``num_batches`` global batches of ``dataset`` in id order
    (samples 0 .. num_batches*global_batch-1), the same on every parallel layout."""
    need = num_batches * global_batch
    if need > len(dataset):
        raise SamplerError(f"evaluation wants {num_batches} x {global_batch} = {need} samples but the split has "
                           f"{len(dataset)}; lower train.eval_batches or prepare a larger --val-frac")
    sampler = GlobalBatchSampler(len(dataset), global_batch, seed=0, shuffle=False)
    return MicroBatchLoader(dataset, sampler, dp_rank, dp, micro_batch, start_step=0,
                            num_workers=num_workers, max_steps=num_batches, stand_in=stand_in)


def step_batches(loader) -> "Iterator[list[dict]]":
    """Group a MicroBatchLoader's stream into the grad-accum micro-batches of each step."""
    batch: list = []
    for micro in loader:
        batch.append(micro)
        if len(batch) == loader.grad_accum:
            yield batch
            batch = []
