"""tools/convert_ckpt.py: export never deletes what it did not create, verifies what it reads, and
inspect reports integrity; every refusal is one line, exit 2."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from tests import tiny_run


@pytest.fixture(scope="module")
def base(tiny_base):
    return tiny_base[1]  # the session's shared 2-step run (read-only: copied before any change)


def convert(*args):
    # conversions start CPU ranks of the saved layout: generous for a shared 2-core CI machine
    return tiny_run.run(["tools/convert_ckpt.py", *args], timeout=600)


def refused(res, needle):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert needle in res.stderr, res.stderr


def test_export_onto_a_run_is_refused_and_the_run_untouched(base, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(base, run_dir)
    before = tiny_run.tree_digest(run_dir)
    refused(convert("export", run_dir, "--out", run_dir), "not empty")
    refused(convert("export", run_dir, "--out", run_dir, "--force"), "not written by convert_ckpt")
    assert tiny_run.tree_digest(run_dir) == before


def test_force_replaces_only_the_tools_own_files(base, tmp_path):
    out = tmp_path / "export"
    assert convert("export", base, "--out", str(out)).returncode == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["files"]["model.safetensors"]["sha256"] == meta["sha256"]
    (out / "notes.txt").write_text("mine")
    refused(convert("export", base, "--out", str(out)), "--force")
    res = convert("export", base, "--out", str(out), "--force")
    assert res.returncode == 0, res.stderr
    assert (out / "notes.txt").read_text() == "mine"  # not the tool's: kept
    assert sorted(os.listdir(out)) == sorted(["notes.txt", "meta.json", *meta["files"]])


def test_truncated_weights_do_not_export(base, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(base, run_dir)
    weights = os.path.join(run_dir, "checkpoints", "step_000002", "model.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(os.path.getsize(weights) - 100)
    refused(convert("export", run_dir, "--out", str(tmp_path / "out")), "model.safetensors")
    assert not (tmp_path / "out").exists()
    refused(convert("inspect", run_dir), "model.safetensors")


def test_inspect_reports_integrity_and_sample_reads_an_export(base, tmp_path):
    res = convert("inspect", base, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["integrity"] == "ok" and info["train_state"]["step"] == 2
    out = tmp_path / "export"
    assert convert("export", base, "--out", str(out)).returncode == 0
    res = tiny_run.run(["tools/sample.py", "--checkpoint", str(out), "--steps", "2", "--num-samples", "1",
                        "--quiet"], timeout=120)  # no --config: the export carries its resolved config
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout.splitlines()[0])["ids"]) == 32


# ---------------------------------------------------------------------------------------------------------
# consolidate / reshard / export-hf on real multi-rank runs (2 gloo ranks; a teacher at ZeRO-1 DP=2 and an EMA
# student at ZeRO-3 DP=2, each checkpointed at step 3 of 6; the rest of each run is the uninterrupted reference)

COMMON = ["train.steps=6", "checkpoint.every=3", "checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def teacher(tiny_base, tmp_path_factory):
    from tests.test_train_teacher import train

    data = tiny_base[0]
    run_dir = str(tmp_path_factory.mktemp("convert") / "teacher_z1")
    # checkpoint.universal: the live universal.safetensors is the reference of the one reshard builds from shards
    res = train(run_dir, data, 2, COMMON + ["parallel.zero_stage=1", "checkpoint.universal=true"])
    assert res.returncode == 0, res.stdout[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def student(teacher, tiny_base):
    """An online MCD student with EMA under ZeRO-3 (the EMA shadow is sharded like the weights)."""
    from tests.test_train_teacher import train

    data = tiny_base[0]
    run_dir = os.path.join(os.path.dirname(teacher), "student_z3_ema")
    res = train(run_dir, data, 2, COMMON + [
        "parallel.zero_stage=3", "train.objective=mcd", "distill.teacher_mode=online", "distill.round=1",
        f"distill.teacher={os.path.join(teacher, 'checkpoints', 'step_000006', 'model.safetensors')}",
        "train.ema_decay=0.5"])
    assert res.returncode == 0, res.stdout[-4000:]
    return run_dir


def _tag_copy(run_dir, dst, drop=()):
    """A new run holding only step 3 of ``run_dir``, as if written with the ``drop`` files switched off."""
    from pathlib import Path

    from tests.test_train_teacher import _checkpoint_copy

    return str(_checkpoint_copy(Path(run_dir), "step_000003", Path(dst), drop=drop))


def _resume(run_dir, nproc, *sets):
    """Launch training from ``run_dir``/config.yaml (reshard's), as a user would, with extra --set."""
    import sys

    from tests.mp import run_cli

    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mcd_scale.train", "--config", os.path.join(run_dir, "config.yaml")]
    for s in sets:
        cmd += ["--set", s]
    res = run_cli(cmd, timeout=420)
    assert res.returncode == 0, res.stdout[-4000:]
    assert "universal resume from" in res.stdout, res.stdout[-2000:]
    return res


def _equal_files(a, b, rtol=0.0):
    from safetensors.torch import load_file

    ta, tb = load_file(a), load_file(b)
    assert sorted(ta) == sorted(tb)
    for k in tb:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        if rtol == 0.0:
            assert torch_equal(ta[k], tb[k]), k
        else:
            scale = tb[k].abs().max().clamp_min(1e-12)
            assert ((ta[k] - tb[k]).abs().max() / scale) <= rtol, (k, float((ta[k] - tb[k]).abs().max() / scale))


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def _reshard_teacher(teacher, tmp_path) -> str:
    """The teacher's step 3 as if saved with universal.safetensors and model.safetensors both off, resharded
    for TP=2 + ZeRO-3: reshard builds both from the DeepSpeed ZeRO-1 DP=2 shards in one conversion, and they equal
    the files the live run wrote (bit for bit). Returns the resharded run."""
    src = _tag_copy(teacher, tmp_path / "src", drop=("universal.safetensors", "model.safetensors"))
    out = str(tmp_path / "resharded")
    res = convert("reshard", src, "--out", out, "--tp", "2", "--pp", "1", "--zero", "3")
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout)
    assert sorted(report["built"]) == ["universal:universal.safetensors", "weights:model.safetensors"]
    tag = os.path.join(out, "checkpoints", "step_000003")
    live = os.path.join(teacher, "checkpoints", "step_000003")
    for name in ("model.safetensors", "universal.safetensors"):
        _equal_files(os.path.join(tag, name), os.path.join(live, name))
    return out


def test_reshard_teacher_from_shards_samples_and_resumes_at_tp2_pp2(teacher, tmp_path):
    """Reshard rebuilds the weights and the universal checkpoint from shards (equal to the live run's files, bit
    for bit; resuming from a live universal checkpoint at TP=2 + ZeRO-3 and ZeRO-0 is
    tests/test_train_teacher.py::test_universal_checkpoint_resumes_at_another_layout, at PP=2 the long tier's
    test_universal_checkpoint_resumes_at_pp2); the resharded run inspects
    clean, samples as it is, and resumes at TP=2 x PP=2 (4 ranks, ZeRO-1) continuing the uninterrupted losses
    (rtol 1e-5); consolidating the TP=2 x PP=2 shards gives the file that run wrote."""
    from tests.test_train_teacher import assert_close, losses

    out = _reshard_teacher(teacher, tmp_path)
    info = json.loads(convert("inspect", out, "--json").stdout)
    assert info["universal"] and info["integrity"] == "ok" and not info["layout"]["deepspeed_files"]
    assert info["parameters"] == info["model.safetensors"]["parameters"] and info["step"] == 3
    res = tiny_run.run(["tools/sample.py", "--checkpoint", out, "--steps", "2", "--num-samples", "1", "--quiet"],
                       timeout=300)  # the resharded run samples as it is
    assert res.returncode == 0, res.stderr
    ref = losses(teacher)
    tp2pp2 = str(tmp_path / "tp2pp2")
    shutil.copytree(out, tp2pp2)
    _resume(tp2pp2, 4, f"run.dir={tp2pp2}", "parallel.zero_stage=1", "parallel.pp=2")
    assert_close(losses(tp2pp2), ref, [4, 5, 6], 1e-5, "reshard -> TP=2 x PP=2", scale=max(map(abs, ref.values())))
    # consolidate from TP=2 x PP=2 shards (TP concatenation, the second stage sent to rank 0): the live run's file
    res = convert("consolidate", tp2pp2, "--out", str(tmp_path / "from_tp2pp2"))
    assert res.returncode == 0, res.stderr[-4000:]
    _equal_files(str(tmp_path / "from_tp2pp2" / "model.safetensors"),
                 os.path.join(tp2pp2, "checkpoints", "step_000006", "model.safetensors"))


@pytest.mark.long  # the suite checks the rebuilt universal file against the live one, whose resume at TP=2 +
# ZeRO-3 tests/test_train_teacher.py::test_universal_checkpoint_resumes_at_another_layout runs
def test_reshard_teacher_resumes_at_tp2_zero3_as_written(teacher, tmp_path):
    """The resharded run's config.yaml as written (TP=2 + ZeRO-3) resumes and continues the uninterrupted losses
    (rtol 1e-5)."""
    from tests.test_train_teacher import assert_close, losses

    out = _reshard_teacher(teacher, tmp_path)
    ref = losses(teacher)
    _resume(out, 2)  # config.yaml as written: TP=2 + ZeRO-3
    assert_close(losses(out), ref, [4, 5, 6], 1e-5, "reshard -> TP=2 + ZeRO-3", scale=max(map(abs, ref.values())))


def test_ema_student_consolidates_and_reshards_with_its_shadow(student, tmp_path):
    """The EMA student (ZeRO-3 DP=2, consolidated off): consolidate --weights ema rebuilds the EMA weights
    from the sharded shadow (equal to what the live run wrote, and --dtype bf16 is their rounding); reshard
    carries the shadow into universal.safetensors, and the run resumed at TP=2 + ZeRO-3 ends at step 6 with the
    uninterrupted run's losses, weights and EMA weights (rtol 1e-5)."""
    import torch
    from safetensors.torch import load_file

    from tests.test_train_teacher import assert_close, losses

    src = _tag_copy(student, tmp_path / "src", drop=("model.safetensors", "model_ema.safetensors"))
    saved = os.path.join(student, "checkpoints", "step_000003")
    res = convert("consolidate", src, "--out", str(tmp_path / "ema_bf16"), "--weights", "ema", "--dtype", "bf16")
    assert res.returncode == 0, res.stderr[-4000:]
    assert json.loads(res.stdout)["peak_rss_mb"] > 0
    built, live = load_file(str(tmp_path / "ema_bf16" / "model.safetensors")), load_file(os.path.join(saved, "model_ema.safetensors"))
    assert sorted(built) == sorted(live)
    for k in live:
        assert built[k].dtype == torch.bfloat16 and torch.equal(built[k], live[k].to(torch.bfloat16)), k
    out = str(tmp_path / "resharded")
    res = convert("reshard", src, "--out", out, "--tp", "2", "--pp", "1")
    assert res.returncode == 0, res.stderr[-4000:]
    uni = load_file(os.path.join(out, "checkpoints", "step_000003", "universal.safetensors"))
    assert {k.split("/")[0] for k in uni} == {"fp32", "exp_avg", "exp_avg_sq", "ema", "meta"}
    _resume(out, 2)
    ref = losses(student)
    assert_close(losses(out), ref, [4, 5, 6], 1e-5, "EMA student reshard -> TP=2 + ZeRO-3",
                 scale=max(map(abs, ref.values())))
    for name in ("model.safetensors", "model_ema.safetensors"):
        _equal_files(os.path.join(out, "checkpoints", "step_000006", name),
                     os.path.join(student, "checkpoints", "step_000006", name), rtol=1e-5)


def test_export_hf_loads_with_automodel_and_matches_our_logits(base, tmp_path):
    """export-hf: AutoModel.from_pretrained(trust_remote_code=True) loads every weight (nothing missing or
    unexpected) and its fp32 logits equal mcd_scale's model within 1e-5; sample.py reads the directory too."""
    import torch
    import yaml
    from transformers import AutoModel

    from mcd_scale.config import from_dict
    from mcd_scale.model.transformer import DiffusionTransformer
    from mcd_scale.model.weights import load_full_state_dict, load_safetensors

    out = tmp_path / "hf"
    res = convert("export-hf", base, "--out", str(out))
    assert res.returncode == 0, res.stderr[-4000:]
    for name in ("config.json", "model.safetensors", "modeling_mcd.py", "tokenizer.model", "sampling_config.json",
                 "README.md"):
        assert (out / name).is_file(), name
    model, info = AutoModel.from_pretrained(str(out), trust_remote_code=True, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    cfg = from_dict(yaml.safe_load((out / "config.resolved.yaml").read_text()))
    ours = DiffusionTransformer(cfg.model).eval()
    load_full_state_dict(ours, load_safetensors(str(out / "model.safetensors")))
    ids = torch.randint(0, cfg.model.vocab_size + 1, (2, cfg.model.seq_len), generator=torch.Generator().manual_seed(0))
    t = torch.rand(2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = model.eval()(ids, timesteps=t).logits
        mine = ours(ids, t)
    assert theirs.dtype == torch.float32 and theirs.shape == mine.shape
    assert (theirs - mine).abs().max() <= 1e-5
    res = tiny_run.run(["tools/sample.py", "--checkpoint", str(out), "--steps", "2", "--num-samples", "1", "--quiet"],
                       timeout=300)
    assert res.returncode == 0, res.stderr


def test_hf_modeling_matches_a_time_conditioned_tied_model(tmp_path):
    """The modeling file's adaLN time conditioning and tied head (paths the tiny run does not use), on random
    weights (modulation made non-zero, or adaLN-Zero would hide it): logits equal ours within 1e-5."""
    import torch
    from transformers import AutoModel

    from mcd_scale.export.export_hf import HF_MODELING, hf_config
    from mcd_scale.config import ModelConfig
    from mcd_scale.model.init import init_weights
    from mcd_scale.model.transformer import DiffusionTransformer
    from mcd_scale.model.weights import full_state_dict, save_safetensors

    m = ModelConfig(vocab_size=60, seq_len=16, hidden=32, layers=2, heads=4, ffn_hidden=48, time_conditioning=True,
                    cond_dim=24, tie_embeddings=True, pad_vocab_multiple=8)
    ours = DiffusionTransformer(m).eval()
    init_weights(ours, seed=3, std=0.2)  # large enough that GELU-tanh vs exact GELU moves logits by 5e-4
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    save_safetensors(full_state_dict(ours), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(vars(m), "float32")))
    shutil.copy(HF_MODELING, tmp_path / "modeling_mcd.py")
    model = AutoModel.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
    ids = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(0))
    t = torch.rand(3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids, timesteps=t).logits - ours(ids, t)).abs().max() <= 1e-5


def test_bad_inputs_are_one_line(base, tmp_path):
    """Bad flags and inputs of the new subcommands: exit 2, one line naming the field or file, nothing written."""
    refused(convert("reshard", base, "--out", str(tmp_path / "r"), "--tp", "3", "--pp", "1"), "--tp 3")
    refused(convert("consolidate", base, "--out", str(tmp_path / "c"), "--weights", "ema"), "train.ema_decay")
    refused(convert("export-hf", base, "--out", str(tmp_path / "h"), "--tokenizer", str(tmp_path / "nope.model")),
            "nope.model")
    refused(convert("consolidate", base, "--out", str(tmp_path / "c"), "--dtype", "fp8"), "--dtype")
    assert not any((tmp_path / d).exists() for d in ("r", "c", "h"))
    run_dir = str(tmp_path / "run")
    shutil.copytree(base, run_dir)
    before = tiny_run.tree_digest(run_dir)
    for cmd in (["consolidate"], ["reshard", "--tp", "1", "--pp", "1"], ["export-hf"]):
        refused(convert(cmd[0], run_dir, "--out", run_dir, *cmd[1:]), "not empty")
        refused(convert(cmd[0], run_dir, "--out", run_dir, "--force", *cmd[1:]), "not written by convert_ckpt")
    assert tiny_run.tree_digest(run_dir) == before
