"""``tools/convert_ckpt.py export-hf``: a Hugging Face directory people can load and sample without mcd_scale.

The directory holds ``config.json`` + ``modeling_mcd.py`` (``AutoModel.from_pretrained(dir,
trust_remote_code=True)``; the network and both samplers, torch/numpy/transformers only), ``model.safetensors``
(the logical weights, raw or EMA), the tokenizer in a form ``AutoTokenizer.from_pretrained(dir)`` loads
(an ``hf`` tokenizer's own files; a SentencePiece model converted to ``tokenizer.json``, ids checked equal),
``sampling_config.json``, a model card ``README.md`` with metadata (license, datasets, the evaluate.py figures
when given) and ``config.resolved.yaml`` with local paths removed, so nothing in the directory names this
machine. ``meta.json`` is the exporter's manifest (what ``--force`` may replace).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import yaml

from mcd_scale.cli import InputError
from mcd_scale.export.convert import (OutputDir, check_safetensors, check_weights_choice, param_count_from_config,
                                      prepare_out, read_cfg, run_workers, tag_step)
from mcd_scale.checkpoint.integrity import verify
from mcd_scale.checkpoint.weights_path import WEIGHT_FILES, resolve_checkpoint_dir
from mcd_scale.config import ModelConfig, from_dict

HF_MODELING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_export", "modeling_mcd.py")
SAMPLERS = ("ancestral", "coupled")
PATH_FIELDS = (("run", "dir"), ("data", "path"), ("data", "trajectories"), ("distill", "teacher"))
"""Config fields that name this machine's files: the exported config.resolved.yaml keeps only their basename."""
SP_BYTE, SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER = 6, 1, 2, 3, 4  # sentencepiece ModelProto piece types


def hf_config(model: dict, dtype: str, diffusion: Optional[dict] = None, sampling: Optional[dict] = None) -> dict:
    """config.json of an export-hf directory from the resolved ``model`` (and ``diffusion``) sections."""
    m = ModelConfig(**model)
    diffusion = diffusion or {}
    return {"architectures": ["MCDModel"], "model_type": "mcd_mdlm",
            "auto_map": {"AutoConfig": "modeling_mcd.MCDConfig", "AutoModel": "modeling_mcd.MCDModel"},
            "vocab_size": m.vocab_size, "padded_vocab": m.padded_vocab, "mask_id": m.mask_id, "seq_len": m.seq_len,
            "hidden": m.hidden, "layers": m.layers, "heads": m.heads, "ffn_hidden": m.ffn_hidden,
            "time_conditioning": m.time_conditioning, "cond_dim": m.cond_dim, "tie_embeddings": m.tie_embeddings,
            "rope_base": m.rope_base, "norm_eps": m.norm_eps, "torch_dtype": dtype,
            "schedule": diffusion.get("schedule", "loglinear"), "schedule_eps": float(diffusion.get("eps", 1e-3)),
            "sampling": dict(sampling or {})}


# ------------------------------------------------------------------------------------------ tokenizer
def sentencepiece_to_fast(model_file: str):
    """A ``tokenizers.Tokenizer`` giving the SentencePiece BPE model's ids (mcd_scale's conventions:
    identity normalisation, no dummy prefix, whitespace as U+2581, byte fallback, ``"\\n"`` a user piece).
    BPE merges are every split of a normal piece into two known pieces, in piece order (SentencePiece
    BPE scores pieces by merge rank)."""
    # lazy: loads sentencepiece, tokenizers; importing this module does not need them
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = pb.ModelProto()
    with open(model_file, "rb") as fh:
        proto.ParseFromString(fh.read())
    if proto.trainer_spec.model_type != 2:  # BPE
        raise InputError(f"{model_file}: only SentencePiece BPE models convert (model_type "
                         f"{proto.trainer_spec.model_type}); pass an HF tokenizer directory with --tokenizer")
    if proto.normalizer_spec.add_dummy_prefix or proto.trainer_spec.treat_whitespace_as_suffix:
        raise InputError(f"{model_file}: a dummy prefix or suffix whitespace is not mcd_scale's convention "
                         f"(tools/prepare_data.py); pass an HF tokenizer directory with --tokenizer")
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    mergeable = {SP_NORMAL, SP_USER, SP_BYTE}
    merges = []
    for pid, p in enumerate(pieces):
        if p.type != SP_NORMAL:
            continue
        for k in range(1, len(p.piece)):
            left, right = p.piece[:k], p.piece[k:]
            if left in vocab and right in vocab and pieces[vocab[left]].type in mergeable \
                    and pieces[vocab[right]].type in mergeable:
                merges.append((pid, vocab[left], vocab[right], left, right))
    merges.sort()
    unk = pieces[proto.trainer_spec.unk_id].piece
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in pieces
                            if p.type in (SP_UNKNOWN, SP_CONTROL)])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in pieces if p.type == SP_USER])
    return tok


def write_tokenizer(tok, out: OutputDir, seq_len: int) -> list[str]:
    """The tokenizer files of an export-hf directory from an mcd_scale tokenizer (``load_tokenizer``); returns
    the names written. ``hf``: its own files (a tokenizer_config.json naming the fast class is added when the
    source has none); ``sentencepiece``: tokenizer.json converted (:func:`sentencepiece_to_fast`) plus the
    original tokenizer.model."""
    names = []
    if tok.kind == "hf":
        for name, src in sorted(tok.files.items()):
            if name != "tokenizer_config.json":
                out.copy(name, src)
                names.append(name)
        config = {}
        if "tokenizer_config.json" in tok.files:
            with open(tok.files["tokenizer_config.json"], encoding="utf-8") as fh:
                config = json.load(fh)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if "eos_token" not in config:
            config["eos_token"] = tok.backend.id_to_token(tok.eos_id)
    elif tok.kind == "sentencepiece":
        src = tok.files.get("tokenizer.model")
        if not src:
            raise InputError("the SentencePiece tokenizer has no file to export; pass --tokenizer tokenizer.model")
        fast = sentencepiece_to_fast(src)
        out.place("tokenizer.json", lambda tmp: fast.save(tmp))
        out.copy("tokenizer.model", src)  # mcd_scale's own tools read it
        names += ["tokenizer.json", "tokenizer.model"]
        piece = fast.id_to_token
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": piece(0), "bos_token": piece(tok.bos_id),
                  "eos_token": piece(tok.eos_id)}
    else:
        raise InputError(f"tokenizer kind {tok.kind!r} cannot be exported")
    config["model_max_length"] = seq_len
    config.pop("auto_map", None)  # the tokenizer is a plain fast tokenizer: no remote code of the source
    out.text("tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
    return names + ["tokenizer_config.json"]


def _tokenizer_source(cfg: dict, ckpt: str, given: Optional[str]) -> str:
    if given:
        return given
    data = (cfg.get("data") or {}).get("path", "")
    if data and os.path.isdir(data):
        return data
    return os.path.dirname(os.path.dirname(ckpt))  # the run directory (its config.resolved.yaml -> data.path)


# ------------------------------------------------------------------------------------------ card
def _scrubbed(cfg: dict) -> dict:
    out = json.loads(json.dumps(cfg))
    for section, key in PATH_FIELDS:
        value = (out.get(section) or {}).get(key)
        if isinstance(value, str) and value:
            out[section][key] = os.path.basename(os.path.normpath(value))
    return out


def read_evaluation(path: str) -> list[dict]:
    """Rows of an ``tools/evaluate.py`` result (JSON list / object with ``rows`` / JSONL)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise InputError(f"--evaluation {path}: {exc.strerror}; pass the JSON or JSONL evaluate.py wrote") from None
    try:
        data = json.loads(text)
        rows = data.get("rows", [data]) if isinstance(data, dict) else data
    except ValueError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            raise InputError(f"--evaluation {path} is neither JSON nor JSONL; pass the file evaluate.py wrote") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise InputError(f"--evaluation {path} holds no result rows (objects); pass the file evaluate.py wrote")
    return rows


def _table(rows: list[dict]) -> str:
    keys = []
    for row in rows:
        keys += [k for k, v in row.items() if k not in keys and isinstance(v, (int, float, str, bool)) and not
                 (isinstance(v, str) and (os.sep in v or len(v) > 40))]  # no paths, no long texts

    def cell(v):
        return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    return head + "".join("| " + " | ".join(cell(r.get(k)) for k in keys) + " |\n" for r in rows)


CARD = """---
{front}---

# {name}

A masked diffusion language model trained with mcd_scale (the method: docs/method.md in its repository):
objective `{objective}`, step {step}, {params:,} parameters, {weights} weights, sequence length {seq_len},
vocabulary {vocab_size} tokens (id {mask_id} is [MASK]).

## Sample

Needs `torch`, `numpy` and `transformers` only (the network and the samplers are in `modeling_mcd.py`):

```python
from transformers import AutoModel, AutoTokenizer

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)  # it reads config.json too
ids = model.sample(num_samples=4, steps={steps}, sampler="{sampler}", temperature={temperature}, seed=0)
print(tok.batch_decode(ids.tolist()))
```

`sampler`: `"ancestral"` (MDLM's) or `"coupled"` (deterministic coupled sampler; `reveal_order="strided"`
never reveals two tokens closer than `stride` in one step). The recommended settings are in
`sampling_config.json`. Every random draw is keyed by (seed, sample index, position), so a sample does not depend
on the batch size, and on the same device the tokens equal those of mcd_scale's own `tools/sample.py` for the
same seed. `model(input_ids, timesteps=t).logits` is the raw network ([B, L, {padded_vocab}]; columns from
{vocab_size} on are the mask and padding, never sampled).

## Evaluation

{evaluation}
## Training

`config.resolved.yaml` is the full training configuration (local paths reduced to their last component).
"""


def model_card(cfg: dict, step: int, params: int, weights: str, sampling: dict, license: str,
               datasets: Sequence[str], evaluation: Optional[list[dict]], repo_id: str) -> str:
    model = cfg.get("model", {})
    front = {"license": license, "library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["masked-diffusion", "mcd_scale", str(cfg.get("train", {}).get("objective", "mdlm"))]}
    if datasets:
        front["datasets"] = list(datasets)
    table = (_table(evaluation) + "\nRows as `tools/evaluate.py` wrote them (docs/evaluation.md of mcd_scale).\n"
             if evaluation else "No evaluation was attached to this export (`export-hf --evaluation FILE`).\n")
    vocab = int(model.get("vocab_size", 0))
    m = ModelConfig(**model)
    return CARD.format(front=yaml.safe_dump(front, sort_keys=False), name=cfg.get("run", {}).get("name", "mcd_scale model"),
                       objective=cfg.get("train", {}).get("objective"), step=step, params=params, weights=weights,
                       seq_len=m.seq_len, vocab_size=vocab, mask_id=m.mask_id, padded_vocab=m.padded_vocab,
                       repo_id=repo_id, steps=sampling["steps"], sampler=sampling["sampler"],
                       temperature=sampling["temperature"], evaluation=table)


def recommended_steps(cfg: dict) -> int:
    """256 for a teacher (MDLM's tables sample with up to 1,024); 1/dt of the trained round for a student."""
    if cfg.get("train", {}).get("objective", "mdlm") == "mdlm":
        return 256
    # lazy: loads torch; importing this module does not need it
    from mcd_scale.distill.rounds import round_dt

    c = from_dict(cfg)
    return max(1, int(round(1.0 / round_dt(c.distill, c.distill.round))))


# ------------------------------------------------------------------------------------------ export
def export_hf(path: str, out: str, weights: str = "raw", tokenizer: Optional[str] = None, force: bool = False,
              license: str = "other", datasets: Sequence[str] = (), evaluation: Optional[str] = None,
              steps: Optional[int] = None, sampler: str = "ancestral", temperature: float = 1.0,
              repo_id: Optional[str] = None) -> dict:
    """Write the directory (module docstring) for the checkpoint ``path`` into ``out``."""
    # lazy: loads numpy, sentencepiece; importing this module does not need them
    from mcd_scale.data.tokenizer import TokenizerError, load_tokenizer

    ckpt = resolve_checkpoint_dir(path)
    cfg = read_cfg(ckpt)
    check_weights_choice(cfg, weights, ckpt)
    if sampler not in SAMPLERS:
        raise InputError(f"--sampler {sampler}: choose one of {', '.join(SAMPLERS)}")
    if steps is not None and steps < 1 or not temperature > 0:
        raise InputError(f"--steps must be >= 1 and --temperature > 0 (got {steps}, {temperature})")
    src = _tokenizer_source(cfg, ckpt, tokenizer)
    try:
        tok = load_tokenizer(src)
    except TokenizerError as exc:
        raise InputError(f"--tokenizer: {exc} (default: the run's data.path)") from None
    vocab = int(cfg["model"]["vocab_size"])
    if tok.vocab_size != vocab:
        raise InputError(f"--tokenizer {src} has {tok.vocab_size} tokens but the model {vocab} (model.vocab_size): "
                         f"pass the tokenizer the run's data was prepared with")
    rows = read_evaluation(evaluation) if evaluation else None
    replaced = prepare_out(out, force)
    name = WEIGHT_FILES["ema" if weights == "ema" else "model"]
    have = os.path.exists(os.path.join(ckpt, name))
    verify(ckpt, [name, "config.resolved.yaml", "train_state.json"] if have else None)
    o = OutputDir(out, replaced)
    if have:
        check_safetensors(os.path.join(ckpt, name))
        o.copy("model.safetensors", os.path.join(ckpt, name))
    else:  # consolidated off: build it from the DeepSpeed shards
        run_workers(ckpt, [{"what": "weights", "weights": weights, "dtype": None,
                            "out": os.path.abspath(o.path("model.safetensors"))}])
        o.adopt("model.safetensors")
    train = cfg.get("train", {})
    sampling = {"sampler": sampler, "steps": int(steps or recommended_steps(cfg)), "temperature": float(temperature)}
    dtype = "bfloat16" if train.get("precision") == "bf16" else "float32"
    hf = hf_config(cfg["model"], dtype, cfg.get("diffusion", {}), sampling)
    o.text("config.json", json.dumps(hf, indent=2))
    o.copy("modeling_mcd.py", HF_MODELING)
    tok_files = write_tokenizer(tok, o, hf["seq_len"])
    o.text("sampling_config.json", json.dumps({**sampling, "mask_id": hf["mask_id"], "vocab_size": hf["vocab_size"],
                                               "seq_len": hf["seq_len"], "schedule": hf["schedule"],
                                               "schedule_eps": hf["schedule_eps"], "objective": train.get("objective"),
                                               "weights": weights}, indent=2))
    clean = _scrubbed(cfg)
    o.text("config.resolved.yaml", yaml.safe_dump(clean, sort_keys=False))
    _n, params = param_count_from_config(cfg)
    step = tag_step(ckpt)
    o.text("README.md", model_card(clean, step, params, weights, sampling, license, datasets, rows,
                                   repo_id or os.path.basename(os.path.normpath(out))))
    o.finish({"weights_format": "mcd_scale-logical-v1", "hf": True, "source_tag": os.path.basename(ckpt),
              "step": step, "ema": weights == "ema", "sha256": o.files["model.safetensors"]["sha256"],
              "tokenizer_kind": tok.kind})
    return {"out": out, "files": sorted(o.files), "tokenizer": tok_files}
