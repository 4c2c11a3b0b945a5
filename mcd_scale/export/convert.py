"""Inspect, export, consolidate and reshard mcd_scale checkpoints: the logic behind ``tools/convert_ckpt.py``
(docs/checkpoints.md; ``export-hf`` lives in :mod:`mcd_scale.export.export_hf`, the command dispatch in :mod:`mcd_scale.export.commands`).

``consolidate`` builds the logical ``model.safetensors`` from the DeepSpeed shards of any layout (also when
``checkpoint.consolidated`` was off): the tag's layout is rebuilt on local CPU ranks (gloo, one process
per saved rank, :mod:`mcd_scale.checkpoint.worker`), DeepSpeed loads its own shards, and rank 0 streams one
logical parameter at a time into the file (:mod:`mcd_scale.checkpoint.consolidate`). ``reshard`` writes a run
directory whose checkpoint resumes training at another TP/PP/ZeRO layout (any DP size) with the optimizer
state: its tag holds ``universal.safetensors`` (fp32 masters, Adam moments, EMA shadow; built from the shards
when the run did not write it) and no DeepSpeed files, plus ``config.yaml`` for the new layout.

``inspect`` lists the checkpoints of a run (tags, ``latest``), the TrainState, the parallel layout and
precision that wrote them, whether it is universal, and the logical tensors of the consolidated weights.
``export`` writes a self-contained directory: ``model.safetensors`` (layout-independent logical weights,
loadable into any TP/PP/ZeRO layout through ``load_full_state_dict``) plus ``config.yaml`` and ``meta.json``.
Nothing is unpickled here; only safetensors, YAML and JSON are read, and every file read is first checked
against the checkpoint's integrity record (size + sha256 in COMPLETE; :mod:`mcd_scale.checkpoint.integrity`).

No output ever deletes what it did not create: a non-empty ``--out`` is refused unless ``force``, and
``force`` only replaces the files listed in that directory's ``meta.json`` (the manifest a previous output
wrote); a directory without that manifest is always refused. Input errors raise
:class:`mcd_scale.cli.InputError` (one line, exit 2 in the tools).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings

import yaml

from mcd_scale.cli import InputError
from mcd_scale.checkpoint.integrity import IntegrityError, read_marker, record_files, sha256_file, verify
from mcd_scale.checkpoint.weights_path import resolve_checkpoint_dir, weights_in
from mcd_scale.config import ConfigError, from_dict, load_config, to_yaml, validate_layout

EXPORT_FORMAT = "mcd_scale-export-v1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the worker ranks import mcd_scale from here


def check_safetensors(path: str) -> None:
    """A header that parses and a data section of the size it declares (catches truncation even for
    a checkpoint written before integrity records)."""
    # lazy: loads safetensors; importing this module does not need it
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as st:
            for key in st.keys():
                st.get_slice(key)
    except Exception as exc:  # SafetensorError has no importable base across versions
        raise IntegrityError(f"{path} is not a readable safetensors file ({' '.join(str(exc).split())}); restore "
                             f"it from a copy of the run or use another checkpoint") from None


def param_count_from_config(cfg_dict: dict) -> tuple[int, int]:
    """(tensors, parameters) of the model a config describes, built on the meta device (no memory)."""
    # lazy: loads torch, megatron; importing this module does not need them
    import torch

    with warnings.catch_warnings():  # megatron's import-time notes about optional fused kernels
        warnings.simplefilter("ignore")
        from mcd_scale.model.logical import logical_parameters
        from mcd_scale.model.transformer import DiffusionTransformer

    cfg = from_dict(cfg_dict)
    with torch.device("meta"):
        model = DiffusionTransformer(cfg.model)
    shapes = [p.logical_shape for _, p in logical_parameters(model)]
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n
    return len(shapes), total


def _sizes(ckpt: str) -> dict:
    """Bytes on disk of the tag by kind."""
    kinds = {"deepspeed": 0, "consolidated": 0, "universal": 0, "ema_shards": 0, "other": 0}
    for dirpath, _dirs, files in os.walk(ckpt):
        for name in files:
            size = os.path.getsize(os.path.join(dirpath, name))
            if name.endswith(".pt"):
                kinds["deepspeed"] += size
            elif name in ("model.safetensors", "model_ema.safetensors"):
                kinds["consolidated"] += size
            elif name == "universal.safetensors":
                kinds["universal"] += size
            elif name.startswith("ema_rank"):
                kinds["ema_shards"] += size
            else:
                kinds["other"] += size
    kinds["total"] = sum(kinds.values())
    return kinds


def inspect(path: str) -> dict:
    """Summary of the latest (or given) tag. An integrity failure is recorded in ``info['integrity']`` as
    ``{"status": "bad", "error": ...}`` and nothing of the bad file is read; main() reports it and exits 2."""
    # lazy: loads torch, safetensors; importing this module does not need them
    from safetensors import safe_open

    from mcd_scale.checkpoint.store import list_tags

    ckpt = resolve_checkpoint_dir(path)
    root = os.path.dirname(ckpt)
    info: dict = {"checkpoint": ckpt, "tags": list_tags(root)}
    bad: set = set()
    try:
        info["integrity"] = verify(ckpt)
    except IntegrityError as exc:
        info["integrity"] = {"status": "bad", "error": " ".join(str(exc).split())}
        bad = {name for name in os.listdir(ckpt) if os.path.join(ckpt, name) in str(exc)}
    marker = read_marker(ckpt)
    for name in ("train_state.json", "config.resolved.yaml"):
        if name in bad:
            return info
    with open(os.path.join(ckpt, "train_state.json"), encoding="utf-8") as fh:
        info["train_state"] = json.load(fh)
    cfg = read_cfg(ckpt)
    world = marker.get("world_size")
    par, train = cfg.get("parallel", {}), cfg.get("train", {})
    tp, pp = int(par.get("tp", 1)), int(par.get("pp", 1))
    info["layout"] = {"world_size": world, "tp": tp, "pp": pp,
                      "dp": (int(world) // (tp * pp)) if world else None, "zero_stage": par.get("zero_stage"),
                      "precision": train.get("precision"), "objective": train.get("objective"),
                      "deepspeed_files": not marker.get("universal_only", False)}
    info["step"] = info["train_state"]["step"]
    info["tokens_seen"] = int(info["train_state"]["consumed_samples"]) * int(cfg.get("model", {}).get("seq_len", 0))
    info["dtype"] = train.get("precision")
    # universal.safetensors (checkpoint.universal, or convert_ckpt reshard): resumes at any TP/PP/DP/ZeRO layout
    info["universal"] = os.path.exists(os.path.join(ckpt, "universal.safetensors"))
    info["ema"] = float(train.get("ema_decay", 0) or 0) > 0
    info["sizes_bytes"] = _sizes(ckpt)
    info["tensors"], info["parameters"] = param_count_from_config(cfg)
    for name in ("model.safetensors", "model_ema.safetensors"):
        f = os.path.join(ckpt, name)
        if not os.path.exists(f) or name in bad:
            continue
        check_safetensors(f)
        with safe_open(f, framework="pt") as st:
            shapes = {k: list(st.get_slice(k).get_shape()) for k in st.keys()}
        count = 0
        for shape in shapes.values():
            n = 1
            for d in shape:
                n *= d
            count += n
        info[name] = {"tensors": len(shapes), "parameters": count, "shapes": shapes}
    return info


def _own_files(out: str) -> list[str]:
    """The files a previous export wrote into ``out`` (its meta.json manifest), or an InputError."""
    meta = os.path.join(out, "meta.json")
    try:
        with open(meta, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT or not isinstance(data.get("files"), dict):
        raise InputError(f"--out {out} is not empty and was not written by convert_ckpt export (no {EXPORT_FORMAT} "
                         f"meta.json): nothing removed; choose an empty or new directory")
    own = [name for name in data["files"] if not os.path.isabs(name) and ".." not in name.split(os.sep)]
    return own + ["meta.json"]


def prepare_out(out: str, force: bool) -> list[str]:
    """Refuse a non-empty ``--out`` (unless ``--force`` and it holds a previous output of this tool, whose
    manifest-listed files are then the only ones replaced) or a file. Returns the files to replace."""
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise InputError(f"--out {out} is not empty: choose an empty or new directory, or pass --force to "
                             f"replace the files of a previous export there (nothing else is ever removed)")
        return _own_files(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out} is a file: choose a directory")
    return []


class OutputDir:
    """The output directory of one command: removes only the files a previous output of ours listed,
    writes each new file under a temporary name then renames it, and writes ``meta.json`` (the manifest
    that makes ``--force`` safe) last, so a half-written directory is never taken for a finished one."""

    def __init__(self, out: str, replaced: list[str]):
        self.out, self.files = out, {}
        os.makedirs(out, exist_ok=True)
        for old in sorted(replaced, key=lambda n: n != "meta.json"):  # meta.json first
            target = os.path.join(out, old)
            if os.path.isfile(target):
                os.remove(target)

    def path(self, rel: str) -> str:
        full = os.path.join(self.out, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        return full

    def place(self, rel: str, write) -> str:
        full = self.path(rel)
        tmp = os.path.join(os.path.dirname(full), f".{os.path.basename(rel)}.tmp.{os.getpid()}")
        write(tmp)
        os.replace(tmp, full)
        return self.adopt(rel)

    def copy(self, rel: str, src: str) -> str:
        return self.place(rel, lambda tmp: shutil.copyfile(src, tmp))

    def text(self, rel: str, text: str) -> str:
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
        return self.place(rel, write)

    def adopt(self, rel: str) -> str:
        """Record a file already written under its final name (by a worker or place())."""
        full = os.path.join(self.out, rel)
        self.files[rel] = {"size": os.path.getsize(full), "sha256": sha256_file(full)}
        return full

    def finish(self, meta: dict) -> None:
        meta = {"format": EXPORT_FORMAT, **meta, "files": self.files}
        tmp = os.path.join(self.out, f".meta.json.tmp.{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=2)
        os.replace(tmp, os.path.join(self.out, "meta.json"))


def read_cfg(ckpt: str) -> dict:
    with open(os.path.join(ckpt, "config.resolved.yaml"), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def tag_step(ckpt: str) -> int:
    with open(os.path.join(ckpt, "train_state.json"), encoding="utf-8") as fh:
        return json.load(fh)["step"]


def run_tokenizer(cfg: dict):
    """The tokenizer of the run's prepared data (its manifest's entry), or None for data without one
    (the synthetic benchmark)."""
    # lazy: loads numpy, sentencepiece; importing this module does not need them
    from mcd_scale.data.tokenizer import load_tokenizer

    data = (cfg.get("data") or {}).get("path") or ""
    manifest = os.path.join(data, "manifest.json")
    if not os.path.isfile(manifest):
        return None
    with open(manifest, encoding="utf-8") as fh:
        if not (json.load(fh).get("tokenizer") or {}).get("path"):
            return None
    return load_tokenizer(data)


def export(path: str, out: str, ema: bool, force: bool = False) -> str:
    ckpt = resolve_checkpoint_dir(path)
    src = weights_in(ckpt, "ema" if ema else "model")
    name = os.path.basename(src)
    replaced = prepare_out(out, force)
    verify(ckpt, [name, "config.resolved.yaml", "train_state.json"])  # before reading any of them
    check_safetensors(src)
    cfg, step = read_cfg(ckpt), tag_step(ckpt)
    o = OutputDir(out, replaced)
    o.copy("model.safetensors", src)
    text = yaml.safe_dump(cfg, sort_keys=False)
    o.text("config.yaml", text)
    o.text("config.resolved.yaml", text)  # sample.py and distill.teacher look for the resolved config beside the weights
    tokenizer = run_tokenizer(cfg)
    for fname, tok_src in sorted(tokenizer.files.items() if tokenizer else ()):
        o.copy(fname, tok_src)  # whichever kind: the directory then resolves with load_tokenizer(out)
    o.finish({"weights_format": "mcd_scale-logical-v1", "source": os.path.abspath(src), "step": step, "ema": ema,
              "sha256": o.files["model.safetensors"]["sha256"]})
    return out


# ------------------------------------------------------------------ conversion ranks (mcd_scale/checkpoint/worker.py)
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(ckpt: str, jobs: list[dict]) -> dict:
    """Rebuild the tag's layout on local CPU ranks (one process per saved rank, gloo) and run ``jobs`` there.
    Returns rank 0's JSON report; an input error of any rank becomes this process's InputError."""
    world = int(read_marker(ckpt).get("world_size", 1))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_"))}
    env.update({"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
                "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world), "LOCAL_SIZE": str(world),
                "MCD_QUIET": "1", "PYTHONUNBUFFERED": "1"})
    arg = json.dumps({"ckpt": os.path.abspath(ckpt), "jobs": jobs})
    with tempfile.TemporaryDirectory(prefix="convert_ckpt_") as tmp:
        procs, logs = [], []
        for rank in range(world):
            e = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
            log = open(os.path.join(tmp, f"rank{rank}.log"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", "mcd_scale.checkpoint.worker", arg], cwd=REPO, env=e,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        try:
            while any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs):
                    time.sleep(3)  # let the peers report their own error, then stop the ones still waiting
                    break
                time.sleep(0.05)
        finally:
            for p in procs:  # only the processes started here
                if p.poll() is None:
                    p.kill()
                    p.wait()
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
    codes = [p.returncode for p in procs]
    if all(c == 0 for c in codes):
        lines = [ln for ln in texts[0].splitlines() if ln.startswith("{")]
        return json.loads(lines[-1]) if lines else {}
    for text in texts:
        for line in text.splitlines():
            if "convert_ckpt: error: " in line:
                raise InputError(line.split("convert_ckpt: error: ", 1)[1])
    bad = next(r for r, c in enumerate(codes) if c != 0)
    raise RuntimeError(f"conversion rank {bad} failed (exit {codes[bad]}):\n{texts[bad][-6000:]}")


def check_weights_choice(cfg: dict, weights: str, ckpt: str) -> None:
    if weights == "ema" and not float(cfg.get("train", {}).get("ema_decay", 0) or 0) > 0:
        raise InputError(f"--weights ema: {ckpt} was trained without EMA (train.ema_decay: 0); use --weights raw")


def consolidate(path: str, out: str, weights: str = "raw", dtype: str | None = None, force: bool = False) -> dict:
    """``model.safetensors`` (+ configs) in ``out``, built from the tag's DeepSpeed shards."""
    ckpt = resolve_checkpoint_dir(path)
    replaced = prepare_out(out, force)
    verify(ckpt)  # every file: DeepSpeed unpickles its shards
    cfg = read_cfg(ckpt)
    check_weights_choice(cfg, weights, ckpt)
    o = OutputDir(out, replaced)
    report = run_workers(ckpt, [{"what": "weights", "weights": weights, "dtype": dtype,
                                 "out": os.path.abspath(o.path("model.safetensors"))}])
    o.adopt("model.safetensors")
    text = yaml.safe_dump(cfg, sort_keys=False)
    o.text("config.yaml", text)
    o.text("config.resolved.yaml", text)
    o.finish({"weights_format": "mcd_scale-logical-v1", "source": os.path.abspath(ckpt), "step": tag_step(ckpt),
              "ema": weights == "ema", "dtype": dtype or cfg.get("train", {}).get("precision"),
              "built_from": "deepspeed shards", "sha256": o.files["model.safetensors"]["sha256"]})
    return {"out": out, **report}


def reshard(path: str, out: str, tp: int, pp: int, zero: int | None = None, world_size: int | None = None,
            force: bool = False) -> dict:
    """A run directory in ``out`` whose latest tag resumes training at tp/pp/zero (any DP size): a
    universal-only tag (universal.safetensors + consolidated weights + TrainState) and config.yaml."""
    # lazy: loads torch; importing this module does not need it
    from mcd_scale.checkpoint.universal import FILE, UNIVERSAL_ONLY, has_ema

    ckpt = resolve_checkpoint_dir(path)
    src_cfg_file = os.path.join(ckpt, "config.resolved.yaml")
    sets = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"run.dir={os.path.abspath(out)}", "checkpoint.load=latest"]
    if zero is not None:
        sets.append(f"parallel.zero_stage={zero}")
    try:
        new_cfg = load_config([src_cfg_file], sets)
        validate_layout(new_cfg, world_size or tp * pp)
    except ConfigError as exc:
        raise InputError(f"the target layout (--tp {tp} --pp {pp}"
                         f"{'' if zero is None else f' --zero {zero}'}) is not valid for {src_cfg_file}: {exc}") from None
    replaced = prepare_out(out, force)
    verify(ckpt)
    cfg, tag = read_cfg(ckpt), os.path.basename(ckpt)
    ema = float(cfg.get("train", {}).get("ema_decay", 0) or 0) > 0
    o = OutputDir(out, replaced)
    rel = lambda name: os.path.join("checkpoints", tag, name)  # noqa: E731
    have_universal = os.path.exists(os.path.join(ckpt, FILE)) and (not ema or has_ema(os.path.join(ckpt, FILE)))
    jobs = [] if have_universal else [{"what": "universal", "out": os.path.abspath(o.path(rel(FILE)))}]
    names = ["model.safetensors"] + (["model_ema.safetensors"] if ema else [])
    for name in names:
        if not os.path.exists(os.path.join(ckpt, name)):
            jobs.append({"what": "weights", "weights": "ema" if "ema" in name else "raw", "dtype": None,
                         "out": os.path.abspath(o.path(rel(name)))})
    report = run_workers(ckpt, jobs) if jobs else {}
    for name in [FILE] + names + ["train_state.json", "config.resolved.yaml"]:
        if os.path.exists(os.path.join(out, rel(name))) and any(j["out"].endswith(rel(name)) for j in jobs):
            continue
        o.copy(rel(name), os.path.join(ckpt, name))
    tagdir = os.path.join(out, "checkpoints", tag)
    # The tag's config.resolved.yaml is the source's: it describes the run that was trained. Without DeepSpeed
    # files no layout loads the tag natively, which COMPLETE says (mcd_scale/checkpoint/universal.py saved_layout).
    marker = {"tag": tag, "world_size": read_marker(ckpt).get("world_size"), UNIVERSAL_ONLY: True,
              "source": os.path.abspath(ckpt), "files": record_files(tagdir)}
    o.text(rel("COMPLETE"), json.dumps(marker, indent=1))
    for name in os.listdir(tagdir):
        if not name.startswith("."):
            o.adopt(rel(name))
    o.text(os.path.join("checkpoints", "latest"), tag)
    o.text("config.yaml", to_yaml(new_cfg))
    o.finish({"source": os.path.abspath(ckpt), "step": tag_step(ckpt), "tp": tp, "pp": pp,
              "zero_stage": new_cfg.parallel.zero_stage, "universal_built_from_shards": not have_universal})
    return {"out": out, "tag": tag, "built": [j["what"] + ":" + os.path.basename(j["out"]) for j in jobs], **report}
