"""export-hf: a directory people load and sample without mcd_scale. A teacher trained with EMA is exported
(EMA weights, tokenizer, card); a fresh interpreter in which mcd_scale cannot be imported loads it with
AutoModel/AutoTokenizer and samples; its tokens equal mcd_scale's own samplers on the same weights and seed,
its tokenizer's ids equal ours. The exported samplers equal ours token for token on a stub network; an HF
tokenizer's files and a SentencePiece model's conversion load with AutoTokenizer and give our ids."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from tests import tiny_run

FRESH = r'''
import importlib.abc, json, sys
class NoMcdScale(importlib.abc.MetaPathFinder):  # the editable install would otherwise be found
    def find_spec(self, name, path=None, target=None):
        if name == "mcd_scale" or name.startswith("mcd_scale."):
            raise ImportError("mcd_scale is not importable in this interpreter")
sys.meta_path.insert(0, NoMcdScale())
try:
    import mcd_scale  # noqa: F401
    raise SystemExit("mcd_scale was importable")
except ImportError:
    pass
from transformers import AutoModel, AutoTokenizer
out, text = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)  # transformers reads config.json first
anc = model.sample(num_samples=3, seed=5)  # the card's recommended sampler, steps and temperature
cpl = model.sample(num_samples=3, steps=8, sampler="coupled", reveal_order="strided", temperature=0.8, seed=5,
                   batch_size=2)
texts = tok.batch_decode(anc.tolist(), skip_special_tokens=True)
enc = tok(text, add_special_tokens=False)["input_ids"]
loaded = sorted(m for m in sys.modules if m.startswith("mcd_scale"))
print(json.dumps({"ancestral": anc.tolist(), "coupled": cpl.tolist(), "texts": texts, "loaded": loaded,
                  "encoded": enc, "round_trip": tok.decode(enc)}))
'''


@pytest.fixture(scope="module")
def ema_teacher(tiny_base, tmp_path_factory) -> tuple[str, str]:
    """(prepared data, run dir): a 3-step teacher (objective mdlm) with train.ema_decay 0.5, validated with its
    EMA weights at step 3 (train.eval_ema)."""
    data = tiny_base[0]
    run_dir = str(tmp_path_factory.mktemp("ema_teacher") / "run")
    res = tiny_run.train(run_dir, data, *EMA_RUN, "train.eval_ema=true")
    assert res.returncode == 0, res.stderr[-4000:]
    return data, run_dir


EMA_RUN = ["train.steps=3", "train.ema_decay=0.5", "schedule.warmup_steps=1", "train.eval_every=3",
           "train.eval_batches=2"]


def _metrics(run_dir: str) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]
    return {"train": {r["step"]: r["loss"] for r in rows if r["split"] == "train"},
            "val": {r["step"]: r["nelbo"] for r in rows if r["split"] == "val"}}


def test_teacher_eval_ema_validates_the_ema_weights_and_leaves_training_alone(ema_teacher, tmp_path):
    """train.eval_ema: the same run validated with its trained weights has the same training losses (the EMA
    is swapped in for validation only) and another validation NELBO (the EMA weights were validated)."""
    data, run_dir = ema_teacher
    raw_dir = str(tmp_path / "raw_eval")
    res = tiny_run.train(raw_dir, data, *EMA_RUN)
    assert res.returncode == 0, res.stderr[-4000:]
    ema, raw = _metrics(run_dir), _metrics(raw_dir)
    assert sorted(ema["train"]) == [1, 2, 3] and ema["train"] == raw["train"]
    assert sorted(ema["val"]) == sorted(raw["val"]) == [3]
    assert abs(ema["val"][3] - raw["val"][3]) > 1e-4, (ema["val"], raw["val"])


def _our_model(run_dir: str, weights_file: str):
    import yaml

    from mcd_scale.config import from_dict
    from mcd_scale.model.transformer import DiffusionTransformer
    from mcd_scale.model.weights import load_full_state_dict, load_safetensors

    ckpt = os.path.join(run_dir, "checkpoints", "step_000003")
    with open(os.path.join(ckpt, "config.resolved.yaml"), encoding="utf-8") as fh:
        cfg = from_dict(yaml.safe_load(fh))
    model = DiffusionTransformer(cfg.model).eval()
    load_full_state_dict(model, load_safetensors(os.path.join(ckpt, weights_file)))
    return cfg, model


def test_export_hf_samples_in_a_fresh_interpreter_without_mcd_scale(ema_teacher, tmp_path):
    from mcd_scale.data.tokenizer import load_tokenizer
    from mcd_scale.diffusion.sampling import ancestral_sample, coupled_sample
    from mcd_scale.diffusion.schedules import get_schedule

    data, run_dir = ema_teacher
    rows = tmp_path / "eval.jsonl"
    rows.write_text(json.dumps({"model": "tiny", "steps": 8, "gen_ppl": 123.25, "entropy": 4.5,
                                "samples": str(tmp_path / "samples.jsonl")}) + "\n")
    out = tmp_path / "hf"
    res = tiny_run.run(["tools/convert_ckpt.py", "export-hf", run_dir, "--out", str(out), "--weights", "ema",
                        "--license", "apache-2.0", "--dataset", "openwebtext", "--evaluation", str(rows),
                        "--steps", "8"], timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    text = "It is a truth universally acknowledged,  that a single man\n\nin possession of a good fortune."
    env = tiny_run.base_env({"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
                             "PYTHONPATH": ""})
    child = subprocess.run([sys.executable, "-I", "-c", FRESH, str(out), text], cwd=str(tmp_path), env=env,
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert child.returncode == 0, child.stderr[-4000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []

    cfg, ours = _our_model(run_dir, "model_ema.safetensors")  # export-hf --weights ema ships the EMA weights
    schedule = get_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
    L, V = cfg.model.seq_len, cfg.model.vocab_size
    with torch.no_grad():
        anc = ancestral_sample(lambda z, t: ours(z, t), 3, L, 8, V, schedule, seed=5).tokens
        cpl = coupled_sample(lambda z, t: ours(z, t), 3, L, 8, V, schedule, seed=5, temperature=0.8,
                             reveal_order="strided").tokens  # one batch of 3 here, batches of 2 there
    assert got["ancestral"] == anc.tolist() and got["coupled"] == cpl.tolist()
    from mcd_scale.checkpoint.integrity import sha256_file

    ckpt = os.path.join(run_dir, "checkpoints", "step_000003")
    shipped = sha256_file(str(out / "model.safetensors"))
    assert shipped == sha256_file(os.path.join(ckpt, "model_ema.safetensors"))  # the teacher's EMA, not its raw
    assert shipped != sha256_file(os.path.join(ckpt, "model.safetensors"))

    tok = load_tokenizer(data)
    assert got["encoded"] == tok.encode([text])[0].tolist()
    assert got["round_trip"] == text
    # Sampled ids decode to text; byte pieces that form no valid UTF-8 may be replaced differently from
    # SentencePiece's decoder (docs/checkpoints.md), so the texts are not compared character by character.
    assert len(got["texts"]) == 3 and all(isinstance(t, str) and t for t in got["texts"])

    card = (out / "README.md").read_text()
    import yaml

    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "apache-2.0" and front["datasets"] == ["openwebtext"], front
    assert "123.2" in card and "gen_ppl" in card
    for f in out.iterdir():  # nothing in the directory names this machine's files
        if f.suffix in (".md", ".json", ".yaml", ".py"):
            body = f.read_text()
            for local in (str(tmp_path), os.path.dirname(run_dir), os.path.dirname(data), tiny_run.REPO):
                assert local not in body, (f.name, local)
    config = json.loads((out / "config.json").read_text())
    assert config["sampling"] == {"sampler": "ancestral", "steps": 8, "temperature": 1.0}


class _Stub(torch.nn.Module):
    """A fixed random network of (token, t): logits [B, L, V + 3] (mask and padding columns included)."""

    def __init__(self, vocab: int, width: int = 64):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.table = torch.randn(vocab + 1, width, generator=g)
        self.out = torch.randn(width, vocab + 3, generator=g) * 0.7
        self.pos = torch.randn(64, width, generator=g) * 0.3

    def forward(self, z, t):
        h = self.table[z] + self.pos[: z.shape[1]] + t[:, None, None].float()
        return torch.tanh(h) @ self.out


@pytest.mark.parametrize("schedule_name", ["loglinear", "cosine"])
def test_exported_samplers_equal_ours_token_for_token(schedule_name):
    from mcd_scale.export.hf_export import modeling_mcd as exported
    from mcd_scale.diffusion.sampling import ancestral_sample, coupled_sample
    from mcd_scale.diffusion.schedules import get_schedule

    V, L, N = 37, 24, 5
    net = _Stub(V)
    schedule = get_schedule(schedule_name, 1e-3)
    cases = [("ancestral", {}, 1.0, 7), ("ancestral", {}, 0.6, 300), ("coupled", {}, 1.0, 7),
             ("coupled", {"reveal_order": "strided"}, 0.7, 6), ("coupled", {"reveal_order": "strided", "stride": 4}, 1.0, 16)]
    for sampler, extra, temp, steps in cases:
        fn = ancestral_sample if sampler == "ancestral" else coupled_sample
        ours = fn(net, N, L, steps, V, schedule, seed=3, temperature=temp, **extra).tokens
        theirs = exported.sample(net, N, L, steps, V, schedule_name, 1e-3, seed=3, sampler=sampler,
                                 temperature=temp, batch_size=2, **extra)
        assert torch.equal(ours, theirs), (sampler, extra, temp, steps)
        other_seed = exported.sample(net, N, L, steps, V, schedule_name, 1e-3, seed=4, sampler=sampler,
                                     temperature=temp, **extra)
        assert not torch.equal(other_seed, theirs)


def test_sentencepiece_conversion_gives_our_ids(tiny_base):
    """The tokenizer.json export-hf makes from a SentencePiece model: the same ids on corpus text and on
    random strings of spaces, tabs, newlines, non-ASCII and pieces (byte fallback included)."""
    from mcd_scale.export.export_hf import sentencepiece_to_fast
    from mcd_scale.data.tokenizer import load_tokenizer

    ours = load_tokenizer(tiny_base[0])
    fast = sentencepiece_to_fast(ours.files["tokenizer.model"])
    import gzip

    with gzip.open(os.path.join(tiny_run.REPO, "data", "austen.txt.gz"), "rt", encoding="utf-8") as fh:
        texts = fh.read(80_000).split("\n\n")[:400]
    rng = random.Random(0)
    parts = [" ", "  ", "\n", "\t", "a", "the", "\u00e9", "\u2603", "\U0001F600", "ing", " of", "Mr.", "1", "23", "\u65e5"]
    texts += ["".join(rng.choice(parts) for _ in range(rng.randint(1, 24))) for _ in range(1500)]
    mine = ours.encode(texts)
    for text, ids in zip(texts, mine):
        assert fast.encode(text, add_special_tokens=False).ids == ids.tolist(), repr(text)
        assert fast.decode(ids.tolist(), skip_special_tokens=False) == text, repr(text)


def test_hf_tokenizer_export_loads_with_autotokenizer(tmp_path_factory, tmp_path):
    from transformers import AutoTokenizer

    from mcd_scale.export.convert import OutputDir
    from mcd_scale.export.export_hf import write_tokenizer
    from mcd_scale.data.tokenizer import load_tokenizer
    from tests.data_fixtures import smollm2_tokenizer_dir

    ours = load_tokenizer(smollm2_tokenizer_dir(tmp_path_factory))
    out = OutputDir(str(tmp_path / "hf"), [])
    names = write_tokenizer(ours, out, seq_len=64)
    assert "tokenizer.json" in names and "tokenizer_config.json" in names
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    texts = ["Hello world!", "  two  spaces\n\nand a paragraph", "caf\u00e9 \u65e5\u672c \U0001F600", "x" * 300]
    for text, ids in zip(texts, ours.encode(texts)):
        assert auto(text, add_special_tokens=False)["input_ids"] == ids.tolist()
    assert auto.eos_token_id == ours.eos_id and auto.model_max_length == 64


def test_export_hf_refuses_a_tokenizer_of_another_vocabulary(tiny_base, tmp_path_factory, tmp_path):
    from tests.data_fixtures import smollm2_tokenizer_dir

    other = smollm2_tokenizer_dir(tmp_path_factory)
    res = tiny_run.run(["tools/convert_ckpt.py", "export-hf", tiny_base[1], "--out", str(tmp_path / "h"),
                        "--tokenizer", other])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "model.vocab_size" in res.stderr, res.stderr
    assert not (tmp_path / "h").exists()
