"""One rank of a checkpoint conversion (started by ``tools/convert_ckpt.py consolidate|reshard``).

Every rank rebuilds the engine at the layout that wrote the tag (its config.resolved.yaml), lets
DeepSpeed load its own shards of the tag (after the integrity check: DeepSpeed unpickles them), reads
its EMA shard when the run has one, and then streams logical tensors to global rank 0, one parameter at
a time (mcd_scale/checkpoint/consolidate.py), which writes them:

* ``weights``: the model weights (``raw``, or ``ema``) in ``dtype`` -> ``model.safetensors``;
* ``universal``: fp32 masters, both Adam moments, the EMA shadow and Adam's step / LR position ->
  ``universal.safetensors`` (mcd_scale/checkpoint/universal.py), which resumes at any layout.

Rank 0 prints one JSON line with what it wrote and its peak RSS. Input errors: one line, exit 2.
Usage (internal): ``python -m mcd_scale.checkpoint.worker JSON`` with the launcher variables of every rank.
"""
from __future__ import annotations

import json
import os
import resource
import sys

from mcd_scale.cli import input_errors_exit
from mcd_scale.config import load_config
from mcd_scale.parallel.distributed import init_distributed, shutdown

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _rss_mb() -> float:
    """Peak resident set size of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def _current_rss_mb() -> float:
    """Resident set size now (MiB; /proc on Linux, the peak elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return _rss_mb()


def _no_loss(*_args):  # the engine is never stepped here; the pipeline module still wants a loss
    raise RuntimeError("convert: the engine must not be stepped")


def _load_engine(ckpt: str):
    # lazy: loads torch, safetensors; importing this module does not need them
    from mcd_scale.training.engine import TrainEngine

    cfg = load_config([os.path.join(ckpt, "config.resolved.yaml")])
    dims = init_distributed(cfg.parallel.tp, cfg.parallel.pp)
    engine = TrainEngine(cfg, dims, _no_loss, init_state=None)
    engine.engine.load_checkpoint(os.path.dirname(ckpt), tag=os.path.basename(ckpt))
    ds_opt = engine.engine.optimizer
    if hasattr(ds_opt, "_lazy_init_hp_params_optimizer_state"):  # link ZeRO-1/2 / bf16 views to loaded state
        ds_opt._hp_optimizer_states_linked = False
        ds_opt._lazy_init_hp_params_optimizer_state()
    ema = None
    if cfg.train.ema_decay > 0:
        from safetensors.torch import load_file

        from mcd_scale.distill.ema import EMA

        ema = EMA([p for p in engine.module.parameters() if p.requires_grad], cfg.train.ema_decay)
        shadow = load_file(os.path.join(ckpt, f"ema_rank{dims.rank}.safetensors"))
        ema.load_state_dict({"decay": ema.decay, "num_updates": 0,
                             "shadow": [shadow[str(i)] for i in range(len(shadow))]})
    return cfg, dims, engine, ema


def _write(engine, dims, ema, order, job: dict) -> dict:
    """One output file, streamed from every rank to rank 0."""
    # lazy: loads torch, megatron; importing this module does not need them
    import torch

    from mcd_scale.checkpoint.consolidate import DTYPE_NAMES, StreamWriter, iter_full
    from mcd_scale.model.weights import local_weight
    from mcd_scale.checkpoint.universal import ema_getter, local_getters, meta_tensors

    if job["what"] == "weights":
        getters = [(None, ema_getter(ema, dims) if job.get("weights") == "ema" else local_weight)]
        dtype = DTYPE_NAMES[job["dtype"]] if job.get("dtype") else None
        meta = {"format": "mcd_scale-logical-v1", "weights": job.get("weights", "raw")}
        extra = {}
    else:
        getters, dtype = local_getters(engine.engine, ema, dims), torch.float32
        meta = {"format": "mcd_scale-universal-v1"}
        extra = meta_tensors(engine.engine)
    entries = [(f"{prefix}/{name}" if prefix else name, dtype or pdtype, shape)
               for prefix, _ in getters for name, shape, pdtype, _stage in order]
    entries += [(k, v.dtype, tuple(v.shape)) for k, v in extra.items()]
    writer = StreamWriter(job["out"], entries, meta) if dims.rank == 0 else None
    largest, start, grew = 0, _current_rss_mb(), 0.0
    try:
        for prefix, local_of in getters:
            for name, full in iter_full(engine.module, dims, local_of, order):
                if writer is not None:
                    largest = max(largest, full.numel() * full.element_size())
                    writer.write(f"{prefix}/{name}" if prefix else name, full)
                grew = max(grew, _current_rss_mb() - start)  # while this tensor is still alive
                del full
        if writer is not None:
            for k, v in extra.items():
                writer.write(k, v)
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    # grew: the most this rank's resident memory rose above its level before the stream (sampled after each
    # tensor): the cost of streaming, to compare with the largest tensor and with the whole model
    return {"out": job["out"], "tensors": len(entries), "largest_tensor_mb": round(largest / 2 ** 20, 3),
            "stream_rss_growth_mb": round(grew, 2)}


def convert(ckpt: str, jobs: list[dict]) -> dict:
    # lazy: loads torch, megatron; importing this module does not need them
    from mcd_scale.parallel import collectives
    from mcd_scale.checkpoint.consolidate import global_parameters

    cfg, dims, engine, ema = _load_engine(ckpt)
    rss_loaded = _rss_mb()
    order = global_parameters(engine.module, dims)
    done = [_write(engine, dims, ema, order, job) for job in jobs]
    collectives.barrier()
    # Peak RSS of rank 0 over the whole process (engine + its shards + the streaming); the growth after the
    # engine was loaded is what the streaming itself cost.
    return {"world_size": dims.world_size, "outputs": done, "rss_after_load_mb": round(rss_loaded, 1),
            "peak_rss_mb": round(_rss_mb(), 1)}


def main(argv=None) -> int:
    job = json.loads((argv or sys.argv[1:])[0])
    with input_errors_exit("convert_ckpt"):
        result = convert(job["ckpt"], job["jobs"])
        if result and int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result), flush=True)
        shutdown(drain=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
