"""Load a trained denoiser and sample rows from it: what tools/sample.py, the demo, benches and experiments share.

A *source* is a run directory (its ``checkpoints/latest`` is used), a checkpoint directory
(``.../checkpoints/step_000200``), an exported directory (``convert_ckpt.py export``) or a
``model.safetensors`` file. The weights are the layout-independent ``model.safetensors``
(``weights="ema"``: ``model_ema.safetensors``), so a model trained with any TP/PP/ZeRO layout samples at
tp=1 on one process; the model config is the ``config.resolved.yaml`` saved beside the weights.

Rows (:func:`sample_rows`) carry what tools/evaluate.py groups by (benchmark, model, round, steps,
temperature, sampler) plus where they came from (checkpoint tag, weights, seed, NFE, seconds), so
``sample.py | evaluate.py`` needs no glue. Under a launcher (torchrun, srun, mpirun) each rank samples a
contiguous block of global sample ids and rank 0 writes the merged rows in id order: since every draw is
keyed by (seed, global sample id), the rows are the same whatever the world size or batch size.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import yaml

from mcd_scale.config import Config, from_dict, load_config
from mcd_scale.diffusion.sampling import SampleResult, ancestral_sample, coupled_sample
from mcd_scale.diffusion.schedules import get_schedule
from mcd_scale.parallel import collectives
from mcd_scale.checkpoint.integrity import verify_file
from mcd_scale.checkpoint.weights_path import WEIGHT_FILES, resolve_weights_path  # noqa: F401 (re-exported)
from mcd_scale.cli import InputError
from mcd_scale.distill.rounds import checkpoint_trained_steps
from mcd_scale.parallel.device import DeviceFlagError, resolve_device
from mcd_scale.parallel.distributed import detect_launch_env, export_launch_env

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A single-process denoiser ready for the samplers."""
    model: torch.nn.Module
    cfg: Config
    weights_path: str
    device: torch.device = torch.device("cpu")  # where the model's parameters live
    precision: str = "fp32"

    @property
    def vocab_size(self) -> int:
        return self.cfg.model.vocab_size

    @property
    def seq_len(self) -> int:
        return self.cfg.model.seq_len

    def denoiser(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(z, t).float()


def resolve_weights(checkpoint: str, weights: str = "model") -> str:
    """Path of the weights file ``--checkpoint`` designates (:mod:`mcd_scale.checkpoint.weights_path`: a run,
    checkpoints or checkpoint directory, an export or a .safetensors file); an input error names the fix."""
    return resolve_weights_path(checkpoint, weights, what="--checkpoint")


def load_model(checkpoint: str, config_files: Sequence[str] = (), overrides: Sequence[str] = (),
               weights: str = "model", device: torch.device | str = "cpu", precision: str = "fp32") -> LoadedModel:
    """Build the tp=1 model from the checkpoint's resolved config (or ``config_files``) and load weights
    (verified against the checkpoint's integrity record, then copied straight into the parameters on
    ``device``). ``precision='bf16'`` casts the parameters after loading (sampling still draws in float64)."""
    # lazy: loads megatron; importing this module does not need it
    from mcd_scale.model.weights import load_full_state_dict, load_safetensors

    path = resolve_weights(checkpoint, weights)
    verify_file(path)  # against the checkpoint's integrity record (or an export's meta.json) before reading
    if config_files:
        cfg = load_config(list(config_files), list(overrides))
    else:
        resolved = os.path.join(os.path.dirname(path), "config.resolved.yaml")
        if not os.path.isfile(resolved):  # an export written before it carried config.resolved.yaml
            resolved = os.path.join(os.path.dirname(path), "config.yaml")
        if not os.path.isfile(resolved):
            raise FileNotFoundError(f"no config.resolved.yaml beside '{path}'; pass --config")
        with open(resolved, encoding="utf-8") as fh:
            cfg = from_dict(yaml.safe_load(fh), source=resolved)
        if overrides:
            raise ValueError("--set needs --config (the resolved config is used as saved)")
    loaded = single_process_model(cfg, init=False, weights_path=path, device=device)
    load_full_state_dict(loaded.model, load_safetensors(path), None)
    if precision != "fp32":
        loaded.model.to(PRECISIONS[precision])
        loaded.precision = precision
    return loaded


def single_process_model(cfg: Config, init: bool, weights_path: str,
                         device: torch.device | str = "cpu") -> LoadedModel:
    """The config's model on one process, fp32, no TP/PP, eval mode (the weights are layout-independent):
    randomly initialised with ``init``, else left for the caller to load."""
    # lazy: loads megatron; importing this module does not need it
    from mcd_scale.model.build import build_model

    cfg.train.precision = "fp32"
    cfg.parallel.activation_checkpointing = False
    model = build_model(cfg, None, init=init, dtype=torch.float32).eval().to(device)
    return LoadedModel(model, cfg, weights_path, torch.device(device))


def sample(loaded: LoadedModel, steps: int, num_samples: int, seed: int, temperature: float = 1.0,
           sampler: str = "ancestral", batch_size: Optional[int] = None, progress: bool = False,
           reveal_order: str = "random", stride: Optional[int] = None, first_sample: int = 0) -> SampleResult:
    """``num_samples`` samples with global ids ``first_sample ..``: sample i is the same whatever the batch
    size or which process draws it (every draw is keyed by (seed, global sample id))."""
    schedule = get_schedule(loaded.cfg.diffusion.schedule, loaded.cfg.diffusion.eps)
    common = dict(temperature=temperature, batch_size=batch_size, time_conditioned=loaded.cfg.model.time_conditioning,
                  progress=progress, device=loaded.device, first_sample=first_sample)
    if sampler == "coupled":
        return coupled_sample(loaded.denoiser, num_samples, loaded.seq_len, steps, loaded.vocab_size, schedule,
                              seed, reveal_order=reveal_order, stride=stride, **common)
    if reveal_order != "random" or stride is not None:
        raise ValueError("--reveal-order/--stride need --sampler coupled (the ancestral sampler draws its "
                         "reveals step by step)")
    return ancestral_sample(loaded.denoiser, num_samples, loaded.seq_len, steps, loaded.vocab_size, schedule,
                            seed, **common)


# ------------------------------------------------------------------------------------------------
# Tokenizer: decode rows with the run's own tokenizer unless told otherwise
# ------------------------------------------------------------------------------------------------
def check_tokenizer(source: str):
    """The tokenizer named by --tokenizer (a prepared data / run / tokenizer directory or a tokenizer.model);
    a bad one is bad input (one line naming it, before any sampling)."""
    # lazy: loads sentencepiece; importing this module does not need it
    from mcd_scale.data.tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(source)
    except TokenizerError as exc:
        raise InputError(f"--tokenizer: {' '.join(str(exc).split())[:300]}") from None


def run_tokenizer(loaded: LoadedModel):
    """The tokenizer the model was trained with, if there is one: beside the weights (an export ships it) or
    the prepared data its resolved config names (``data.path``). None for a run on data without a tokenizer
    (the synthetic benchmark); a note on stderr when the config names data that is not here."""
    # lazy: loads sentencepiece; importing this module does not need it
    from mcd_scale.data.tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(os.path.dirname(os.path.abspath(loaded.weights_path)))
    except TokenizerError as exc:
        if "does not exist here" in str(exc):
            print(f"sample: note: rows carry ids as text ({' '.join(str(exc).split())}); pass --tokenizer",
                  file=sys.stderr, flush=True)
        return None


def decode_rows(tokens: torch.Tensor, tokenizer=None) -> list[str]:
    """Texts of the rows with ``tokenizer`` (a loaded tokenizer or a source for load_tokenizer), else the ids
    space-separated (synthetic data)."""
    if tokenizer is not None:
        if isinstance(tokenizer, str):
            # lazy: loads sentencepiece; importing this module does not need it
            from mcd_scale.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        return [tokenizer.decode(row.tolist()) for row in tokens]
    return [" ".join(str(int(i)) for i in row) for row in tokens]


# ------------------------------------------------------------------------------------------------
# Rows: what tools/evaluate.py needs, from the checkpoint and the flags
# ------------------------------------------------------------------------------------------------
def model_identity(loaded: LoadedModel) -> dict[str, Any]:
    """(model, round, trained_steps, checkpoint tag) of the loaded checkpoint, from its resolved config:
    ``model`` is 'teacher' for the MDLM objective, else the distillation objective ('mcd', 'sdtt')."""
    objective = loaded.cfg.train.objective
    is_student = objective in ("mcd", "sdtt")
    directory = os.path.dirname(os.path.abspath(loaded.weights_path))
    return {"model": objective if is_student else "teacher",
            "round": int(loaded.cfg.distill.round) if is_student else 0,
            "trained_steps": checkpoint_trained_steps(loaded.cfg),
            "checkpoint": os.path.basename(directory)}


def sampler_name(sampler: str, reveal_order: str) -> str:
    """The report's sampler name (mcd_scale/eval/report.py SAMPLERS)."""
    if sampler == "coupled":
        return "coupled-strided" if reveal_order == "strided" else "coupled"
    return "ancestral"


def build_rows(loaded: LoadedModel, res: SampleResult, texts: Sequence[str], *, first_sample: int, steps: int,
               temperature: float, sampler: str, reveal_order: str, seed: int, benchmark: str,
               weights: str, model: Optional[str] = None, round_: Optional[int] = None,
               tokenizer: Optional[str] = None) -> list[dict]:
    """One evaluate.py row per sample (``index`` = global sample id; ``tokenizer``: what decoded ``text``,
    which evaluate.py --gen-ppl reloads to map the model's EOS onto the evaluator's)."""
    ident = model_identity(loaded)
    if model is not None:
        ident["model"] = model
    if round_ is not None:
        ident["round"] = int(round_)
    n = max(len(texts), 1)
    common = {"benchmark": benchmark, **ident, "steps": int(steps), "temperature": float(temperature),
              "sampler": sampler_name(sampler, reveal_order), "weights": weights, "seed": int(seed),
              "nfe": float(res.nfe), "seconds_per_sample": res.seconds / n, "tokenizer": tokenizer}
    return [{"index": first_sample + i, **common, "text": text, "ids": row.tolist()}
            for i, (text, row) in enumerate(zip(texts, res.tokens))]


def rank_block(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first id, count) of this rank's contiguous block of the global sample ids 0..num_samples-1."""
    lo = num_samples * rank // world_size
    hi = num_samples * (rank + 1) // world_size
    return lo, hi - lo


def gather_rows(rows: list[dict], world_size: int) -> Optional[list[dict]]:
    """All ranks' rows on rank 0, sorted by global sample id (None on other ranks); a no-op on one process."""
    if world_size <= 1:
        return sorted(rows, key=lambda r: r["index"])
    # Through collectives (not torch.distributed directly): the object collective then runs on the backend's
    # device under NCCL as every other collective of ours. Rows are small (ids + text), so all ranks gathering
    # costs nothing that matters; only rank 0 keeps them.
    gathered = collectives.all_gather_object(rows)
    if collectives.rank() != 0:
        return None
    return sorted((r for part in gathered for r in part), key=lambda r: r["index"])


def write_rows(rows: list[dict], out: Optional[str], summary: dict) -> None:
    """The rows as JSONL to ``out`` (atomically: ``.tmp`` then rename) or stdout, the summary to
    ``<out>.summary.json`` and one JSON line on stderr."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(out + ".tmp", out)
        with open(out + ".summary.json", "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    print(json.dumps(summary), file=sys.stderr, flush=True)


@dataclass
class SampleJob:
    """Everything one sampling run needs (tools/sample.py's flags)."""
    checkpoint: str
    steps: int
    num_samples: int = 8
    seed: int = 0
    temperature: float = 1.0
    sampler: str = "ancestral"
    reveal_order: str = "random"
    stride: Optional[int] = None
    batch_size: Optional[int] = None
    weights: str = "model"
    config_files: Sequence[str] = ()
    overrides: Sequence[str] = ()
    device: Optional[str] = None
    precision: str = "fp32"
    tokenizer: Optional[str] = None  # None: the run's own (run_tokenizer); "" or "none": ids only
    benchmark: Optional[str] = None  # None: "text" when a tokenizer decodes the rows, else "synthetic"
    model: Optional[str] = None
    round: Optional[int] = None
    out: Optional[str] = None
    progress: bool = True
    single_process: bool = False  # sample everything here even under a launcher (a caller's rank-0-only step)


def launch_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from whichever launcher started us (one process: (0, 1, 0))."""
    le = detect_launch_env()
    return le.rank, le.world_size, le.local_rank


def prepare(job: SampleJob) -> tuple[LoadedModel, Any, str, tuple[int, int, int]]:
    """Check every input and load the model (before any sampling: bad input costs nothing).
    Returns (model, tokenizer or None, benchmark, (rank, world, local rank))."""
    if job.steps < 1 or job.num_samples < 1 or job.temperature <= 0:
        raise ValueError("need --steps >= 1, --num-samples >= 1, --temperature > 0")
    if (job.reveal_order != "random" or job.stride is not None) and job.sampler != "coupled":
        raise ValueError("--reveal-order/--stride need --sampler coupled (the ancestral sampler draws its "
                         "reveals step by step)")
    if job.stride is not None and job.stride < 1:
        raise ValueError(f"--stride must be >= 1, got {job.stride}")
    if job.precision not in PRECISIONS:
        raise ValueError(f"--precision {job.precision!r}: use one of {sorted(PRECISIONS)}")
    rank, world, local_rank = (0, 1, 0) if job.single_process else launch_world()
    device_flag = job.device
    if device_flag is None and world > 1 and torch.cuda.is_available():
        device_flag = f"cuda:{local_rank % torch.cuda.device_count()}"  # one GPU per local rank
    try:
        device = resolve_device(device_flag)
    except DeviceFlagError as exc:
        raise ValueError(str(exc)) from None
    if job.precision == "bf16" and device.type != "cuda":
        raise ValueError("--precision bf16 is for CUDA devices (a CPU samples in fp32); drop it or pass --device cuda")
    ids_only = job.tokenizer in ("", "none")
    tokenizer = None
    if job.tokenizer and not ids_only:  # before sampling: a bad tokenizer must not cost the whole run's output
        tokenizer = check_tokenizer(job.tokenizer)
    loaded = load_model(job.checkpoint, job.config_files, job.overrides, job.weights, device, job.precision)
    if tokenizer is None and not ids_only:
        tokenizer = run_tokenizer(loaded)
    if tokenizer is not None and tokenizer.vocab_size > loaded.vocab_size:
        raise ValueError(f"--tokenizer {tokenizer.name}: {tokenizer.vocab_size} tokens, but the model has "
                         f"model.vocab_size {loaded.vocab_size}; pass the tokenizer of the model's data")
    benchmark = job.benchmark or ("text" if tokenizer else "synthetic")
    return loaded, tokenizer, benchmark, (rank, world, local_rank)


def run_sampling(job: SampleJob, prepared: Optional[tuple] = None) -> Optional[list[dict]]:
    """Sample ``job`` (this rank's block of ids under a launcher) and write the merged rows from rank 0.
    Returns the merged rows on rank 0, None on other ranks."""
    loaded, tokenizer, benchmark, (rank, world, _) = prepared or prepare(job)
    if world > 1:
        if not dist.is_initialized():  # rows only travel once, at the end: gloo is enough on any device
            export_launch_env(detect_launch_env())
            dist.init_process_group("gloo")
    first, count = rank_block(job.num_samples, rank, world)
    if count > 0:
        res = sample(loaded, job.steps, count, job.seed, job.temperature, job.sampler, job.batch_size,
                     progress=job.progress and rank == 0, reveal_order=job.reveal_order, stride=job.stride,
                     first_sample=first)
        rows = build_rows(loaded, res, decode_rows(res.tokens, tokenizer), first_sample=first, steps=job.steps,
                          temperature=job.temperature, sampler=job.sampler, reveal_order=job.reveal_order,
                          seed=job.seed, benchmark=benchmark, weights=job.weights, model=job.model,
                          round_=job.round, tokenizer=tokenizer.name if tokenizer is not None else None)
    else:
        rows = []
    merged = gather_rows(rows, world)
    if merged is None:
        return None
    nfe = sum(r["nfe"] for r in merged) / len(merged)
    summary = {"checkpoint": loaded.weights_path, "sampler": job.sampler, "reveal_order": job.reveal_order,
               "stride": (job.stride or min(job.steps, loaded.seq_len)) if job.reveal_order == "strided" else None,
               "steps": job.steps, "device": str(loaded.device), "precision": loaded.precision,
               "world_size": world, "temperature": job.temperature, "seed": job.seed,
               "num_samples": job.num_samples, "seq_len": loaded.seq_len, "nfe": nfe,
               "seconds_per_sample": sum(r["seconds_per_sample"] for r in merged) / len(merged),
               "tokenizer": tokenizer.name if tokenizer is not None else None, "benchmark": benchmark}
    write_rows(merged, job.out, summary)
    return merged
