"""A training run's checkpoints: which one to resume, resuming it, and saving new ones.

Resume: every rank resolves the tag (``checkpoint.load``: latest, a tag or none) on the filesystem all ranks
share and verifies its integrity record before anything reads it; a checkpoint written by another layout resumes
from its ``universal.safetensors`` (or is refused with the fix); otherwise DeepSpeed's own files, this rank's RNG
streams and EMA shard are loaded. The TrainState carries the step and the data cursor.

Save: the DeepSpeed state, the TrainState (with the data cursor), the per-rank RNG streams and EMA shard, and,
gathered on rank 0, the consolidated weights (``checkpoint.consolidated``), the EMA weights and the universal
file (``checkpoint.universal``), written and sealed by :func:`mcd_scale.checkpoint.store.save_checkpoint`.

The engine (``TrainEngine``) and the EMA are passed in: this module sits below training/ and distill/.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

from safetensors.torch import load_file

from mcd_scale.checkpoint import universal
from mcd_scale.checkpoint.deepspeed_files import use_safe_loader
from mcd_scale.checkpoint.store import (TrainState, checkpoint_root, load_rng_states, load_train_state,
                                        resolve_load_tag, restore_rng, save_checkpoint, verify_tag)
from mcd_scale.config import Config, ConfigError, to_yaml
from mcd_scale.parallel import collectives
from mcd_scale.parallel.distributed import ParallelDims


def _barrier():
    collectives.barrier()


class CheckpointManager:
    """Resolves and verifies the checkpoint to resume at construction (every rank); ``resume`` loads it into an
    engine, ``save`` writes a new one."""

    def __init__(self, cfg: Config, dims: ParallelDims, rank: int):
        self.cfg, self.dims, self.rank = cfg, dims, rank
        self.run_dir = cfg.run.dir
        self.root = checkpoint_root(self.run_dir)
        # Every rank resolves the tag itself: checkpoints live on a filesystem all ranks share. Every rank
        # verifies the tag's integrity record before anything reads it (DeepSpeed unpickles its .pt files),
        # so a bad file is one line naming it on every rank.
        self.resume_tag = resolve_load_tag(self.root, cfg.checkpoint.load)
        if self.resume_tag is not None:  # the ranks split the hashing and agree (a 1B tag is ~17 GB)
            verify_tag(self.root, self.resume_tag, self.rank, dims.world_size, collectives.all_gather_object)
        self.universal = self._universal_resume()  # path of universal.safetensors when the layout changed

    # ------------------------------------------------------------------ resume
    def _universal_resume(self) -> Optional[str]:
        """The universal file to resume from when the checkpoint to resume was written by another layout (None when the
        layout is the same or there is nothing to resume); a ConfigError naming the fix when it cannot be."""
        if self.resume_tag is None:
            return None
        ckpt = os.path.join(self.root, self.resume_tag)
        saved = universal.saved_layout(ckpt)
        here = universal.layout_of(self.cfg.parallel, self.cfg.train.precision, self.dims.world_size)
        changed = [k for k in here if saved[k] != here[k]]
        if not changed or universal.native_resume_ok(saved, here):
            return None
        diff = ", ".join(f"{k} {saved[k]} -> {here[k]}" for k in changed)
        path = os.path.join(ckpt, universal.FILE)
        if not os.path.exists(path):
            raise ConfigError(f"{ckpt} was written by another layout ({diff}) and has no {universal.FILE}: resume "
                              f"with the saved layout, or write checkpoints with 'checkpoint.universal: true' to "
                              f"resume at any layout")
        reason = universal.refuse_reason(self.cfg, path)
        if reason:
            raise ConfigError(f"{ckpt}: resuming at another layout ({diff}): {reason}")
        if self.rank == 0:
            print(f"universal resume from {path}: {diff}", flush=True)
        return path

    def initial_weights(self, default: Optional[dict]) -> Optional[dict]:
        """The weights the engine is built with: the universal file's on a resume at another layout, else
        ``default`` (a distilled student's teacher weights, or None)."""
        if self.universal is not None:
            return universal.weights_of(self.universal)
        return default

    def resume(self, engine: Any, ema: Any) -> Optional[TrainState]:
        """Loads the resolved checkpoint into ``engine`` (and ``ema``); its TrainState, or None when there is
        nothing to resume."""
        tag = self.resume_tag
        if tag is None:
            return None
        state = load_train_state(self.root, tag)  # layout-independent: step, data cursor, round
        if self.universal is not None:  # another layout: no per-rank RNG or EMA files apply; EMA from the file
            universal.load_universal(engine, self.universal, global_batch=self.cfg.parallel.global_batch,
                                     train_step=state.step, ema=ema,
                                     ema_updates=int(state.extra.get("ema_updates", 0)))
        else:
            self._load_native(tag, engine, ema, state)
        if self.rank == 0:
            print(f"resumed from {os.path.join(self.root, tag)} at step {state.step}", flush=True)
        return state

    def _load_native(self, tag: str, engine: Any, ema: Any, state: TrainState) -> None:
        """DeepSpeed's own checkpoint, this rank's RNG streams and EMA shard (same layout)."""
        use_safe_loader(engine.engine)  # DeepSpeed's .pt files: weights_only=True with an explicit allowlist
        engine.engine.load_checkpoint(self.root, tag=tag)
        rest = restore_rng(load_rng_states(self.root, tag, self.rank))
        if ema is not None:
            ema_file = os.path.join(self.root, tag, f"ema_rank{self.rank}.safetensors")
            if not os.path.exists(ema_file):
                raise FileNotFoundError(f"{ema_file} is missing: the checkpoint was written without EMA or at another "
                                        f"world size; resume with the same layout or set train.ema_decay: 0")
            shadow = load_file(ema_file)
            ema.load_state_dict({"decay": ema.decay, "num_updates": int(state.extra.get("ema_updates", 0)),
                                 "shadow": [shadow[str(i)] for i in range(len(shadow))]})
        rng = getattr(engine.module, "rng", None)
        if rest and rng is not None:
            rng.set_states({k.split("/", 1)[1]: v for k, v in rest.items() if k.startswith("dropout/")})

    # ------------------------------------------------------------------ save
    def save(self, engine: Any, state: TrainState, ema: Any, on_staged: Callable[[], None]) -> None:
        """A checkpoint of ``state.step`` (collective: every rank calls it). Records the data cursor and the EMA
        update count in ``state``; ``on_staged`` runs once the files are staged, before they are sealed."""
        cfg = self.cfg
        full = engine.full_state_dict() if cfg.checkpoint.consolidated else None
        rng = getattr(engine.module, "rng", None)
        extra = {f"dropout/{k}": v for k, v in rng.get_states().items()} if rng is not None else None
        state.data_cursor = {"consumed_samples": state.consumed_samples,
                             "global_batch": cfg.parallel.global_batch, "seed": cfg.train.seed}
        extra_files = {}
        if ema is not None:
            st = ema.state_dict()
            state.extra["ema_updates"] = st["num_updates"]
            extra_files[f"ema_rank{self.rank}.safetensors"] = {str(i): t for i, t in enumerate(st["shadow"])}
            if cfg.checkpoint.consolidated:
                with ema.swap_in():
                    ema_full = engine.full_state_dict()
                if self.rank == 0:
                    extra_files["model_ema.safetensors"] = ema_full
        if cfg.checkpoint.universal:
            tensors = universal.gather_universal(engine, ema)  # collective; the whole state on rank 0 only
            if self.rank == 0:
                extra_files[universal.FILE] = tensors
        save_checkpoint(engine.engine, self.run_dir, state, to_yaml(cfg), self.rank,
                        self.dims.world_size, cfg.checkpoint.keep_last,
                        full_weights=full if self.rank == 0 else None, rng_extra=extra, barrier=_barrier,
                        extra_files=extra_files, on_staged=on_staged,
                        gather_object=collectives.all_gather_object)
