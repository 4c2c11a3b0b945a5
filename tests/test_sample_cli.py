"""tools/sample.py and mcd_scale.inference on a tiny randomly initialised checkpoint: resolution, determinism,
output format."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mcd_scale.config import load_config, save_resolved
from mcd_scale.model.build import build_model
from mcd_scale.model.weights import full_state_dict, save_safetensors

from mcd_scale import inference as sample_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tools", "sample.py")


def run_cli(args, timeout=300):
    return subprocess.run([sys.executable, SAMPLE, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir laid out like the trainer's: checkpoints/latest -> step_000001/{model.safetensors, config}."""
    run = tmp_path_factory.mktemp("run")
    cfg = load_config([], ["model.vocab_size=20", "model.seq_len=12", "model.hidden=32", "model.layers=1",
                           "model.heads=2", "model.ffn_hidden=64", "model.pad_vocab_multiple=8",
                           "train.seed=7"])
    model = build_model(cfg, None, init=True, dtype=torch.float32)
    ckpt = run / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    save_safetensors(full_state_dict(model, None), str(ckpt / "model.safetensors"))
    save_resolved(cfg, str(ckpt / "config.resolved.yaml"))
    (ckpt / "COMPLETE").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_000001")
    return run


def test_resolve_weights(run_dir):
    expected = str(run_dir / "checkpoints" / "step_000001" / "model.safetensors")
    assert sample_cli.resolve_weights(str(run_dir)) == expected
    assert sample_cli.resolve_weights(str(run_dir / "checkpoints" / "step_000001")) == expected
    assert sample_cli.resolve_weights(expected) == expected
    with pytest.raises(FileNotFoundError):
        sample_cli.resolve_weights(str(run_dir / "nope"))
    with pytest.raises(FileNotFoundError):
        sample_cli.resolve_weights(str(run_dir), "ema")


@pytest.mark.parametrize("sampler", ["coupled", "ancestral"])
def test_same_seed_same_tokens(run_dir, sampler):
    loaded = sample_cli.load_model(str(run_dir))
    a = sample_cli.sample(loaded, steps=6, num_samples=5, seed=3, temperature=0.9, sampler=sampler)
    b = sample_cli.sample(loaded, steps=6, num_samples=5, seed=3, temperature=0.9, sampler=sampler, batch_size=2)
    c = sample_cli.sample(loaded, steps=6, num_samples=5, seed=4, temperature=0.9, sampler=sampler)
    assert a.tokens.shape == (5, 12)
    assert torch.equal(a.tokens, b.tokens)  # same seed, any batch size
    assert not torch.equal(a.tokens, c.tokens)  # the seed matters (20^60 outcomes: a tie would be a bug)
    assert int(a.tokens.min()) >= 0 and int(a.tokens.max()) < 20  # never the mask id
    assert 1 <= a.nfe <= 6 + 1


def test_cli_writes_jsonl_and_summary(run_dir, tmp_path):
    out = tmp_path / "s.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "sample.py"), "--checkpoint", str(run_dir), "--steps", "4",
           "--num-samples", "3", "--sampler", "coupled", "--seed", "1", "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 1, 2]
    for row in rows:
        assert row["text"] == " ".join(str(i) for i in row["ids"]) and len(row["ids"]) == 12
    summary = json.loads((tmp_path / "s.jsonl.summary.json").read_text())
    assert summary["steps"] == 4 and 1 <= summary["nfe"] <= 5 and summary["seconds_per_sample"] > 0
    for row in rows:  # what tools/evaluate.py groups by, read from the checkpoint and the flags
        assert {k: row[k] for k in ("benchmark", "model", "round", "steps", "temperature", "sampler", "checkpoint",
                                    "seed", "weights")} == {
            "benchmark": "synthetic", "model": "teacher", "round": 0, "steps": 4, "temperature": 1.0,
            "sampler": "coupled", "checkpoint": "step_000001", "seed": 1, "weights": "model"}
        assert row["nfe"] == summary["nfe"] and row["seconds_per_sample"] > 0
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    untimed = lambda rs: [{k: v for k, v in r.items() if k != "seconds_per_sample"} for r in rs]  # noqa: E731
    assert r2.returncode == 0
    assert untimed(json.loads(line) for line in out.read_text().splitlines()) == untimed(rows)
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "missing"), "--steps", "4"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "error" in bad.stderr


def test_cli_strided_reveal_order(run_dir, tmp_path):
    """--reveal-order strided: a coupled-sampler option (recorded in the summary); refused with the ancestral
    sampler or a bad stride, exit 2 with the flag named."""
    out = tmp_path / "s.jsonl"
    base = [sys.executable, os.path.join(ROOT, "tools", "sample.py"), "--checkpoint", str(run_dir), "--steps", "4",
            "--num-samples", "2", "--seed", "1", "--quiet", "--out", str(out)]
    r = subprocess.run(base + ["--sampler", "coupled", "--reveal-order", "strided"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "s.jsonl.summary.json").read_text())
    assert summary["reveal_order"] == "strided" and summary["stride"] == 4 and summary["nfe"] == 4
    for extra in (["--reveal-order", "strided"], ["--sampler", "coupled", "--reveal-order", "strided", "--stride", "0"]):
        bad = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and ("--reveal-order" in bad.stderr or "--stride" in bad.stderr), bad.stderr
    loaded = sample_cli.load_model(str(run_dir))
    with pytest.raises(ValueError, match="--sampler coupled"):
        sample_cli.sample(loaded, steps=4, num_samples=1, seed=0, reveal_order="strided")


def test_device_flag_bad_value_exits_2_with_one_line(run_dir, capsys):
    missing_cuda = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    for bad in ("gpu0", missing_cuda):
        r = run_cli(["--checkpoint", str(run_dir), "--steps", "2", "--num-samples", "1", "--device", bad])
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and "--device" in err[0], (bad, err)


def test_device_flag_cpu_runs_and_reports_device(run_dir, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    r = run_cli(["--checkpoint", str(run_dir), "--steps", "3", "--num-samples", "2", "--device", "cpu",
                 "--sampler", "coupled", "--quiet", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "s.jsonl.summary.json").read_text())
    assert summary["device"] == "cpu"
    direct = sample_cli.sample(sample_cli.load_model(str(run_dir)), 3, 2, 0, sampler="coupled")
    assert [json.loads(line)["ids"] for line in out.read_text().splitlines()] == direct.tokens.tolist()


def test_ranks_split_the_ids_and_rank0_writes_the_same_rows_as_one_process(run_dir, tmp_path):
    """Under a launcher each rank samples its block of ids; rank 0 writes them merged in id order, the same
    tokens as one process (every draw keyed by the global sample id), and only rank 0 writes."""
    from tests.mp import run_cli_ranks

    def rows_of(path):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds_per_sample"}
                for line in open(path, encoding="utf-8")]

    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    common = ["--checkpoint", str(run_dir), "--steps", "3", "--num-samples", "5", "--seed", "2", "--quiet",
              "--tokenizer", "none", "--device", "cpu"]
    r = run_cli(common + ["--out", str(one)])
    assert r.returncode == 0, r.stderr
    codes, logs = run_cli_ranks([SAMPLE, *common, "--out", str(two)], world_size=2, timeout=120)
    assert codes == [0, 0], logs
    assert rows_of(two) == rows_of(one) and [r["index"] for r in rows_of(two)] == [0, 1, 2, 3, 4]
    assert json.loads((tmp_path / "two.jsonl.summary.json").read_text())["world_size"] == 2
    assert sample_cli.rank_block(5, 0, 2) == (0, 2) and sample_cli.rank_block(5, 1, 2) == (2, 3)
