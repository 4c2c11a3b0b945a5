"""Checkpoints: DeepSpeed engine state + our own TrainState, written atomically.

Layout of ``<run.dir>/checkpoints/``::

    step_000200/                  one checkpoint (renamed into place only when complete)
        <DeepSpeed engine files>  model/optimizer/scheduler shards, per its own layout
        train_state.json          TrainState (step, consumed samples, data cursor, counters)
        rng_rank{r}.safetensors   per-rank RNG states (dropout streams); no pickle
        config.resolved.yaml      the resolved config that produced it
        model.safetensors         layout-independent full weights (checkpoint.consolidated)
        model_ema.safetensors     the same for the EMA weights (train.ema_decay > 0)
        ema_rank{r}.safetensors   per-rank EMA shadow (sharded like the weights under ZeRO-3)
        COMPLETE                  marker written last inside the staged directory: JSON with every
                                  file's size and sha256 (mcd_scale/checkpoint/integrity.py; verified on read)
    latest                        text file with the newest complete tag, replaced atomically last

Atomicity: every rank writes into ``.staging/<tag>``; after a barrier rank 0 renames it to
``<tag>`` and only then rewrites ``latest`` (write temp + os.replace). A crash at any point leaves
either the previous checkpoint or the new one, never a half-written one named as latest.
Loading uses safetensors / JSON / DeepSpeed's own loader; nothing of ours is unpickled, and every
file DeepSpeed will unpickle is verified against the COMPLETE record first (:func:`verify_tag`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from mcd_scale.checkpoint.integrity import IntegrityError, record_files, verify
from mcd_scale.errors import MissingCheckpoint

TAG_RE = re.compile(r"^step_(\d{6,})$")


@dataclass
class TrainState:
    """Everything the loop needs to resume exactly, owned by us (not reached into DeepSpeed)."""
    step: int = 0
    consumed_samples: int = 0
    data_cursor: dict = field(default_factory=dict)
    nonfinite_skipped: int = 0
    nonfinite_in_a_row: int = 0
    round: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "train_state.json") -> "TrainState":
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{source}: unknown TrainState fields {sorted(unknown)}")
        return cls(**data)


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_tags(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    tags = [d for d in os.listdir(root) if TAG_RE.match(d) and os.path.exists(os.path.join(root, d, "COMPLETE"))]
    return sorted(tags, key=lambda d: int(TAG_RE.match(d).group(1)))


def read_latest(root: str, fix: Optional[str] = None) -> Optional[str]:
    """The tag ``root/latest`` names, None without a ``latest`` file; a tag that is missing or incomplete is
    refused with ``fix`` (default: the training run's)."""
    path = os.path.join(root, "latest")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        tag = fh.read().strip()
    if not tag or not os.path.exists(os.path.join(root, tag, "COMPLETE")):
        fix = fix or f"point 'checkpoint.load' at one of {list_tags(root)} or remove the run directory"
        raise MissingCheckpoint(f"{path} names '{tag}' but {os.path.join(root, tag)} is missing or incomplete; {fix}")
    return tag


def resolve_load_tag(root: str, load: str) -> Optional[str]:
    """'latest' -> newest complete tag or None; 'none' -> None; '200' / 'step_000200' -> that tag."""
    if load == "none":
        return None
    if load == "latest":
        return read_latest(root)
    tag = tag_for(int(load)) if load.isdigit() else load
    if not os.path.exists(os.path.join(root, tag, "COMPLETE")):
        raise MissingCheckpoint(f"'checkpoint.load' = {load!r}: no complete checkpoint {os.path.join(root, tag)}; "
                                f"available: {list_tags(root) or 'none'}")
    return tag


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_state_tensors(extra: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    for k, v in (extra or {}).items():
        states[k] = v
    return states


def save_checkpoint(engine, run_dir: str, state: TrainState, config_yaml: str, rank: int, world_size: int,
                    keep_last: int, full_weights: Optional[dict[str, torch.Tensor]] = None,
                    rng_extra: Optional[dict[str, torch.Tensor]] = None, barrier=None,
                    extra_files: Optional[dict[str, dict[str, torch.Tensor]]] = None,
                    on_staged: Optional[Callable[[], None]] = None,
                    gather_object: Optional[Callable[[Any], list]] = None) -> str:
    """Save engine + TrainState atomically. Collective: every rank must call it.

    ``gather_object`` (``collectives.all_gather_object`` in a job): every rank hashes its share of the staged
    files (balanced by bytes) and rank 0 merges the records, instead of rank 0 hashing them all while the
    others wait. Without it rank 0 hashes everything.

    ``on_staged`` runs on every rank once all files are staged and before COMPLETE (fault injection:
    ``MCD_FAULT_EXIT_IN_SAVE``)."""
    root = checkpoint_root(run_dir)
    tag = tag_for(state.step)
    staging_root = os.path.join(root, ".staging")
    staged = os.path.join(staging_root, tag)
    if rank == 0:
        # A directory left in .staging is a save that died before its rename (saves never overlap):
        # never a checkpoint, so remove it rather than let partial copies pile up. (DeepSpeed also drops
        # its helper scripts, e.g. zero_to_fp32.py, there; those are files and stay.)
        if os.path.isdir(staging_root):
            for leftover in os.listdir(staging_root):
                if os.path.isdir(os.path.join(staging_root, leftover)):
                    shutil.rmtree(os.path.join(staging_root, leftover))
        os.makedirs(staged, exist_ok=True)
    barrier()
    engine.save_checkpoint(staging_root, tag=tag, save_latest=False)
    save_file({k: v.contiguous() for k, v in rng_state_tensors(rng_extra).items()},
              os.path.join(staged, f"rng_rank{rank}.safetensors"))
    for name, tensors in (extra_files or {}).items():  # e.g. per-rank EMA shards, consolidated EMA weights
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(staged, name))
    if rank == 0:
        _atomic_write(os.path.join(staged, "train_state.json"), state.to_json())
        _atomic_write(os.path.join(staged, "config.resolved.yaml"), config_yaml)
        if full_weights is not None:
            save_file({k: v.contiguous() for k, v in full_weights.items()}, os.path.join(staged, "model.safetensors"),
                      metadata={"format": "mcd_scale-logical-v1", "step": str(state.step)})
    barrier()
    if on_staged is not None:
        on_staged()
    # Every rank's files are staged (barrier above): record each one's size and sha256 so readers can
    # verify what they read before anything (DeepSpeed's unpickler included) opens it.
    if gather_object is not None:
        parts = gather_object(record_files(staged, share=(rank, world_size)))
        files = dict(sorted(kv for part in parts for kv in part.items()))
    else:
        files = record_files(staged) if rank == 0 else {}
    if rank == 0:
        _atomic_write(os.path.join(staged, "COMPLETE"),
                      json.dumps({"tag": tag, "world_size": world_size, "files": files}, indent=1))
        final = os.path.join(root, tag)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staged, final)
        _atomic_write(os.path.join(root, "latest"), tag)
        _prune(root, keep_last)
    barrier()
    return tag


def _prune(root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    tags = list_tags(root)
    for old in tags[:-keep_last]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def verify_tag(root: str, tag: str, rank: int = 0, world_size: int = 1,
               gather_object: Optional[Callable[[Any], list]] = None) -> str:
    """Every file of a tag against its integrity record, before any of it is read (IntegrityError names
    the bad file). Returns "ok" or "unrecorded" (a marker written before records existed).

    With ``gather_object`` (collective) the ranks split the hashing (each its share, balanced by bytes) and
    agree: every rank raises the same IntegrityError when any share has a bad file."""
    ckpt = os.path.join(root, tag)
    if gather_object is None:
        return verify(ckpt)
    try:
        result, error = verify(ckpt, share=(rank, world_size)), None
    except IntegrityError as exc:
        result, error = None, str(exc)
    errors = [e for e in gather_object(error) if e]
    if errors:
        raise IntegrityError(errors[0])
    return result


def load_train_state(root: str, tag: str) -> TrainState:
    path = os.path.join(root, tag, "train_state.json")
    with open(path, encoding="utf-8") as fh:
        return TrainState.from_json(fh.read(), path)


def load_rng_states(root: str, tag: str, rank: int) -> dict[str, torch.Tensor]:
    path = os.path.join(root, tag, f"rng_rank{rank}.safetensors")
    if not os.path.exists(path):  # resuming on a different world size: keep the fresh streams
        return {}
    return load_file(path)


def restore_rng(states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Restore torch's global streams; return the remaining (tracker) states for the caller."""
    rest = dict(states)
    if "torch_cpu" in rest:
        torch.set_rng_state(rest.pop("torch_cpu"))
    if "torch_cuda" in rest:
        cuda = rest.pop("torch_cuda")
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda)
    return rest


def describe(root: str) -> dict[str, Any]:
    """A summary of a checkpoint directory (used by tools and error messages)."""
    return {"root": root, "tags": list_tags(root), "latest": read_latest(root) if os.path.exists(
        os.path.join(root, "latest")) else None}
