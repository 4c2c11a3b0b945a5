"""Every entry point x every kind of bad input: exit 2, ONE line naming the file or field, no traceback,
no file of an existing run changed (its tree is hashed before and after) and no pickle payload run.

The table runs each tool's ``main(argv)`` in this process (a few ms to a second each); only the cases
that reach the trainer (which starts a process group) run as subprocesses, one of them on 2 ranks so
that "on every rank" is checked. Shared fixture: the session's prepared corpus and 2-step run (conftest's
``tiny_base``), plus damaged copies of both. ``MCD_DEBUG=1`` turns the one line back into the traceback (last test).
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import sys
import zlib

import pytest

from tests import tiny_run
from tests.mp import REPO, run_cli, run_cli_ranks

ENTRY_POINTS = {  # name -> the script users run
    "train": "mcd_scale/train.py", "precompute": "tools/precompute_trajectories.py",
    "distill_rounds": "tools/distill_rounds.py", "sample": "tools/sample.py", "evaluate": "tools/evaluate.py",
    "prepare_data": "tools/prepare_data.py", "convert": "tools/convert_ckpt.py", "demo": "tools/demo.py",
    "ideal_rows": "tools/ideal_rows.py",
}
STEP = os.path.join("checkpoints", "step_000002")
RUNS = ("run", "trunc", "pickled_pt", "pickled_st", "data", "bad_manifest", "trunc_shard")  # hashed per case


def entry_main(name: str):
    """The ``main`` of an entry point, imported once (tools/ is not a package: load by path)."""
    if name == "train":
        from mcd_scale.train import main
        return main
    mod_name = f"_entry_{name}"
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, os.path.join(REPO, ENTRY_POINTS[name]))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[mod_name].main


def _copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_base):
    tmp = str(tmp_path_factory.mktemp("entry"))
    data, run_dir = tiny_base  # the session's shared corpus and 2-step run (hashed per case: never changed)
    e = {"tmp": tmp, "data": data, "run": run_dir, "missing": os.path.join(tmp, "does_not_exist"),
         "marker": os.path.join(tmp, "PAYLOAD_RAN")}
    e["trunc"] = _copy(run_dir, os.path.join(tmp, "trunc"))  # consolidated weights lost their tail
    weights = os.path.join(e["trunc"], STEP, "model.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(os.path.getsize(weights) // 2)
    e["pickled_pt"] = _copy(run_dir, os.path.join(tmp, "pickled_pt"))  # DeepSpeed's model states: a payload
    tiny_run.pickle_payload(os.path.join(e["pickled_pt"], STEP, "mp_rank_00_model_states.pt"), e["marker"])
    e["pickled_st"] = _copy(run_dir, os.path.join(tmp, "pickled_st"))  # a pickle posing as safetensors
    tiny_run.pickle_payload(os.path.join(e["pickled_st"], STEP, "model.safetensors"), e["marker"])
    e["bad_manifest"] = _copy(data, os.path.join(tmp, "bad_manifest"))
    with open(os.path.join(e["bad_manifest"], "manifest.json"), "w", encoding="utf-8") as fh:
        fh.write("{not json")
    e["trunc_shard"] = _copy(data, os.path.join(tmp, "trunc_shard"))
    shard = os.path.join(e["trunc_shard"], "train", "shard-000000.tar")
    with open(shard, "r+b") as fh:
        fh.truncate(os.path.getsize(shard) // 3)
    files = {"bad_tok": b"not a sentencepiece model", "bad_yaml": b"model: [hidden: 3\n",
             "bad_samples": b"{not json\n", "bad_gz": b"\x1f\x8b\x08\x00truncated gzip",
             "a_file": b"a plain file, not a directory\n"}
    names = {"bad_tok": "bad_tokenizer.model", "bad_yaml": "bad_config.yaml", "bad_samples": "bad_samples.jsonl",
             "bad_gz": "bad_corpus.txt.gz", "a_file": "a_file.txt"}
    for key, content in files.items():
        e[key] = os.path.join(tmp, names[key])
        with open(e[key], "wb") as fh:
            fh.write(content)
    e["syn_samples"] = os.path.join(tmp, "syn_samples.jsonl")
    with open(e["syn_samples"], "w", encoding="utf-8") as fh:
        fh.write('{"benchmark": "synthetic", "model": "teacher", "round": 0, "steps": 4, "temperature": 1.0, '
                 '"ids": [1, 2, 3]}\n')
    e["text_samples"] = os.path.join(tmp, "text_samples.jsonl")
    with open(e["text_samples"], "w", encoding="utf-8") as fh:
        fh.write('{"benchmark": "text", "model": "teacher", "round": 0, "steps": 4, "temperature": 1.0, '
                 '"text": "a b"}\n')
    return e


def T(e, *extra, run="run", data="data"):
    """train.py's argv (without the interpreter part) for the tiny config on ``e[run]`` / ``e[data]``."""
    return tiny_run.train_argv(e[run], e[data], *extra)[2:]


def _chain(e) -> str:
    """A small synthetic chain file (tools/ideal_rows.py's --chain), written once into the case directory."""
    path = os.path.join(e["tmp"], "chain.json")
    if not os.path.exists(path):
        from mcd_scale.eval.synthetic import MarkovChain2

        MarkovChain2(num_symbols=8, branching=2, seed=0, fanout=2).save(path)
    return path


def ckpt(e, run="run", step=STEP):
    return os.path.join(e[run], step)


DISTILL = ["--config", "configs/tiny/distill.yaml"]
# (case id, entry point, argv builder, text the one error line must contain). Ids ending in "!" run as a
# subprocess (they reach the trainer); "!!" on 2 ranks.
CASES = [
    # train.py
    ("train/missing-data", "train", lambda e: T(e, "train.steps=3", data="missing"), "data.path"),
    ("train/dry-run-missing-data", "train", lambda e: T(e, data="missing") + ["--dry-run"], "data.path"),
    ("train/corrupt-manifest", "train", lambda e: T(e, "train.steps=3", data="bad_manifest"), "manifest.json"),
    ("train/truncated-shard", "train", lambda e: T(e, "train.steps=3", data="trunc_shard"), "shard-000000"),
    ("train/missing-step", "train", lambda e: T(e, "train.steps=3", "checkpoint.load=15"), "checkpoint.load"),
    ("train/bad-field", "train", lambda e: T(e, "model.hiddn=3"), "hiddn"),
    ("train/missing-config", "train", lambda e: ["--config", e["missing"] + ".yaml"], "does_not_exist"),
    ("train/corrupt-config", "train", lambda e: ["--config", e["bad_yaml"]], "bad_config.yaml"),
    ("train/bad-flag", "train", lambda e: T(e) + ["--stepz", "3"], "--stepz"),
    ("train/truncated-weights!", "train", lambda e: T(e, "train.steps=3", run="trunc"), "model.safetensors"),
    ("train/pickle-pt!!", "train", lambda e: T(e, "train.steps=3", run="pickled_pt"), "mp_rank_00_model_states.pt"),
    # tools/precompute_trajectories.py
    ("precompute/missing-teacher", "precompute",
     lambda e: ["--teacher", e["missing"], "--data", e["data"], "--out", e["tmp"] + "/traj"], "does_not_exist"),
    ("precompute/missing-step", "precompute",
     lambda e: ["--teacher", ckpt(e, step="checkpoints/step_000015"), "--data", e["data"], "--out",
                e["tmp"] + "/traj"], "step_000015"),
    ("precompute/truncated-teacher", "precompute",
     lambda e: ["--teacher", e["trunc"], "--data", e["data"], "--out", e["tmp"] + "/traj"], "model.safetensors"),
    ("precompute/pickle-teacher", "precompute",
     lambda e: ["--teacher", e["pickled_st"], "--data", e["data"], "--out", e["tmp"] + "/traj"], "model.safetensors"),
    ("precompute/missing-data", "precompute",
     lambda e: ["--teacher", e["run"], "--data", e["missing"], "--out", e["tmp"] + "/traj"], "does_not_exist"),
    ("precompute/corrupt-manifest", "precompute",
     lambda e: ["--teacher", e["run"], "--data", e["bad_manifest"], "--out", e["tmp"] + "/traj"], "manifest.json"),
    ("precompute/bad-field", "precompute",
     lambda e: ["--teacher", e["run"], "--data", e["data"], "--out", e["tmp"] + "/traj", "--set", "model.hiddn=3"],
     "hiddn"),
    ("precompute/missing-config", "precompute",
     lambda e: ["--teacher", e["run"], "--data", e["data"], "--out", e["tmp"] + "/traj", "--config", e["missing"]],
     "does_not_exist"),
    ("precompute/bad-flag", "precompute",
     lambda e: ["--teacher", e["run"], "--data", e["data"], "--out", e["tmp"] + "/traj", "--round", "x"], "--round"),
    # tools/distill_rounds.py
    ("distill_rounds/missing-teacher", "distill_rounds",
     lambda e: ["--teacher", e["missing"], *DISTILL, "--out", e["tmp"] + "/rounds"], "does_not_exist"),
    ("distill_rounds/missing-step", "distill_rounds",
     lambda e: ["--teacher", ckpt(e, step="checkpoints/step_000015"), *DISTILL, "--out", e["tmp"] + "/rounds"],
     "step_000015"),
    ("distill_rounds/truncated-teacher", "distill_rounds",
     lambda e: ["--teacher", e["trunc"], *DISTILL, "--out", e["tmp"] + "/rounds"], "model.safetensors"),
    ("distill_rounds/pickle-teacher", "distill_rounds",
     lambda e: ["--teacher", e["pickled_st"], *DISTILL, "--out", e["tmp"] + "/rounds"], "model.safetensors"),
    ("distill_rounds/missing-config", "distill_rounds",
     lambda e: ["--teacher", e["run"], "--config", e["missing"], "--out", e["tmp"] + "/rounds"], "does_not_exist"),
    ("distill_rounds/corrupt-config", "distill_rounds",
     lambda e: ["--teacher", e["run"], "--config", e["bad_yaml"], "--out", e["tmp"] + "/rounds"], "bad_config.yaml"),
    ("distill_rounds/bad-field", "distill_rounds",
     lambda e: ["--teacher", e["run"], *DISTILL, "--set", "distill.roundz=2", "--out", e["tmp"] + "/rounds"],
     "roundz"),
    ("distill_rounds/bad-flag", "distill_rounds",
     lambda e: ["--teacher", e["run"], *DISTILL, "--objective", "x", "--out", e["tmp"] + "/rounds"], "--objective"),
    ("distill_rounds/old-run-dir-flag", "distill_rounds",  # the deprecated spelling still parses
     lambda e: ["--teacher", e["missing"], *DISTILL, "--run-dir", e["tmp"] + "/rounds"], "does_not_exist"),
    # tools/sample.py
    ("sample/missing", "sample", lambda e: ["--checkpoint", e["missing"], "--steps", "2"], "does_not_exist"),
    ("sample/missing-step", "sample",
     lambda e: ["--checkpoint", ckpt(e, step="checkpoints/step_000015"), "--steps", "2"], "step_000015"),
    ("sample/truncated", "sample", lambda e: ["--checkpoint", e["trunc"], "--steps", "2"], "model.safetensors"),
    ("sample/pickle", "sample", lambda e: ["--checkpoint", e["pickled_st"], "--steps", "2"], "model.safetensors"),
    ("sample/bad-tokenizer", "sample",
     lambda e: ["--checkpoint", e["run"], "--steps", "2", "--tokenizer", e["bad_tok"]], "bad_tokenizer.model"),
    ("sample/missing-tokenizer", "sample",
     lambda e: ["--checkpoint", e["run"], "--steps", "2", "--tokenizer", e["missing"]], "does_not_exist"),
    ("sample/bad-steps", "sample", lambda e: ["--checkpoint", e["run"], "--steps", "0"], "--steps"),
    ("sample/bad-flag", "sample", lambda e: ["--checkpoint", e["run"], "--steps", "2", "--sampler", "x"], "--sampler"),
    ("sample/missing-config", "sample",
     lambda e: ["--checkpoint", e["run"], "--steps", "2", "--config", e["missing"]], "does_not_exist"),
    ("sample/bad-field", "sample",
     lambda e: ["--checkpoint", e["run"], "--steps", "2", "--config", "configs/tiny/teacher.yaml", "--set",
                "model.hiddn=3"], "hiddn"),
    # tools/evaluate.py
    ("evaluate/missing-samples", "evaluate",
     lambda e: ["--samples", e["missing"], "--out", e["tmp"] + "/eval"], "does_not_exist"),
    ("evaluate/corrupt-samples", "evaluate",
     lambda e: ["--samples", e["bad_samples"], "--out", e["tmp"] + "/eval"], "bad_samples.jsonl"),
    ("evaluate/missing-chain", "evaluate",
     lambda e: ["--samples", e["syn_samples"], "--out", e["tmp"] + "/eval", "--synthetic-chain", e["missing"]],
     "does_not_exist"),
    ("evaluate/corrupt-chain", "evaluate",
     lambda e: ["--samples", e["syn_samples"], "--out", e["tmp"] + "/eval", "--synthetic-chain", e["bad_samples"]],
     "bad_samples.jsonl"),
    ("evaluate/bad-tokenizer", "evaluate",
     lambda e: ["--samples", e["text_samples"], "--out", e["tmp"] + "/eval", "--tokenizer", e["bad_tok"],
                "--ar-evaluator", e["missing"]], "bad_tokenizer.model"),
    ("evaluate/missing-ar-evaluator", "evaluate",
     lambda e: ["--samples", e["text_samples"], "--out", e["tmp"] + "/eval", "--ar-evaluator", e["missing"]],
     "does_not_exist"),
    ("evaluate/bad-flag", "evaluate",
     lambda e: ["--samples", e["text_samples"], "--out", e["tmp"] + "/eval", "--seed", "x"], "--seed"),
    # tools/prepare_data.py
    ("prepare_data/missing-input", "prepare_data",
     lambda e: [e["missing"], "--out", e["tmp"] + "/prep2", "--quiet"], "does_not_exist"),
    ("prepare_data/corrupt-gzip", "prepare_data",
     lambda e: [e["bad_gz"], "--out", e["tmp"] + "/prep2", "--quiet"], "bad_corpus.txt.gz"),
    ("prepare_data/bad-value", "prepare_data",
     lambda e: [os.path.join(e["tmp"], "corpus.txt"), "--out", e["tmp"] + "/prep2", "--seq-len", "1"], "--seq-len"),
    ("prepare_data/bad-flag", "prepare_data",
     lambda e: [os.path.join(e["tmp"], "corpus.txt"), "--vocab-size", "x"], "--vocab-size"),
    # tools/convert_ckpt.py
    ("convert/missing", "convert", lambda e: ["inspect", e["missing"]], "does_not_exist"),
    ("convert/missing-step", "convert", lambda e: ["inspect", ckpt(e, step="checkpoints/step_000015")],
     "step_000015"),
    ("convert/export-onto-run", "convert", lambda e: ["export", e["run"], "--out", e["run"]], "not empty"),
    ("convert/truncated", "convert",
     lambda e: ["export", e["trunc"], "--out", e["tmp"] + "/x"], "model.safetensors"),
    ("convert/pickle-pt", "convert", lambda e: ["inspect", e["pickled_pt"]], "mp_rank_00_model_states.pt"),
    ("convert/pickle-st", "convert",
     lambda e: ["export", e["pickled_st"], "--out", e["tmp"] + "/x"], "model.safetensors"),
    ("convert/bad-flag", "convert", lambda e: ["frobnicate", e["run"]], "frobnicate"),
    # tools/demo.py (its inputs are flags and the run directory)
    ("demo/bad-flag", "demo", lambda e: ["--launcher", "x", "--out", e["tmp"] + "/demo"], "--launcher"),
    ("demo/bad-nproc", "demo", lambda e: ["--nproc", "0", "--out", e["tmp"] + "/demo"], "--nproc"),
    ("demo/out-is-a-file", "demo", lambda e: ["--out", e["a_file"]], "a_file.txt"),
    ("demo/smollm2-without-text", "demo",
     lambda e: ["--smollm2", "--benchmarks", "synthetic", "--out", e["tmp"] + "/demo"], "--smollm2"),
    ("demo/bad-temperature", "demo", lambda e: ["--student-temperatures", "0", "--out", e["tmp"] + "/demo"],
     "--student-temperatures"),
    ("demo/bad-source", "demo", lambda e: ["--synthetic-source", "hmm", "--out", e["tmp"] + "/demo"],
     "--synthetic-source"),
    # tools/ideal_rows.py
    ("ideal_rows/missing-chain", "ideal_rows",
     lambda e: ["--chain", e["missing"], "--seq-len", "8", "--out", e["tmp"] + "/ideal.jsonl"], "does_not_exist"),
    ("ideal_rows/truncated-teacher", "ideal_rows",
     lambda e: ["--chain", _chain(e), "--teacher-checkpoint", e["trunc"], "--out", e["tmp"] + "/ideal.jsonl"],
     "model.safetensors"),
    ("ideal_rows/bad-kind", "ideal_rows",
     lambda e: ["--chain", e["missing"], "--kinds", "mcd-best", "--out", e["tmp"] + "/ideal.jsonl"], "--kinds"),
]


def test_every_entry_point_is_in_the_table():
    assert {entry for _, entry, _, _ in CASES} == set(ENTRY_POINTS)


def _run_case(env, case_id, entry, argv, capsys, monkeypatch):
    """(exit code, stderr + stdout) of one case, in-process or as (a) subprocess(es)."""
    if case_id.endswith("!!"):
        codes, logs = run_cli_ranks([ENTRY_POINTS[entry], *argv], world_size=2, timeout=240)
        return (2 if codes == [2, 2] else codes), logs  # every rank's own exit code
    if case_id.endswith("!"):
        res = tiny_run.run([ENTRY_POINTS[entry], *argv], timeout=240)
        return res.returncode, res.stderr + res.stdout
    monkeypatch.chdir(REPO)
    try:
        rc = entry_main(entry)(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, err + out


@pytest.mark.parametrize("case_id,entry,build,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(env, case_id, entry, build, needle, capsys, monkeypatch):
    argv = build(env)
    before = {k: tiny_run.tree_digest(env[k]) for k in RUNS}
    rc, text = _run_case(env, case_id, entry, argv, capsys, monkeypatch)
    errors = [ln for ln in text.splitlines() if "error" in ln.lower()]
    ranks = 2 if case_id.endswith("!!") else 1
    assert rc == 2, f"{case_id}: rc {rc}\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    assert not any(ln.lstrip().startswith("usage:") for ln in text.splitlines()), text[-3000:]  # not argparse's block
    assert len(errors) == ranks and all(needle in ln for ln in errors), f"{case_id}: {errors}\n{text[-3000:]}"
    if ranks > 1:
        assert {ln.split("]")[0] for ln in errors} == {"[rank 0", "[rank 1"}, errors
    assert not os.path.exists(env["marker"]), "a pickle payload was unpickled"
    assert {k: tiny_run.tree_digest(env[k]) for k in RUNS} == before  # no file of an existing run changed


DEBUG_CASES = ["train/missing-data", "precompute/truncated-teacher", "distill_rounds/truncated-teacher",
               "sample/truncated", "evaluate/corrupt-samples", "convert/missing", "prepare_data/corrupt-gzip"]


@pytest.mark.parametrize("case_id", DEBUG_CASES)
def test_debug_switch_raises_the_input_error(env, case_id, monkeypatch):
    """MCD_DEBUG=1: the input error propagates (its traceback is what a bug report needs)."""
    _, entry, build, _ = next(c for c in CASES if c[0] == case_id)
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MCD_DEBUG", "1")
    with pytest.raises(Exception) as info:
        entry_main(entry)(build(env))
    assert not isinstance(info.value, SystemExit), info.value


def test_torchrun_wrapper_keeps_the_exit_code():
    """Plain torchrun exits 1 whatever its ranks returned; ``python -m mcd_scale.torchrun`` (the README's
    launch line) exits with the failed rank's 2 for a config error."""
    res = run_cli([sys.executable, "-m", "mcd_scale.torchrun", "--nproc_per_node", "1", "-m", "mcd_scale.train",
                   "--config", "configs/tiny/teacher.yaml", "--set", "model.hiddn=3"], timeout=240)
    assert res.returncode == 2, res.stdout[-3000:]
    assert "[rank 0] config error" in res.stdout and "hiddn" in res.stdout, res.stdout[-3000:]
    assert "Traceback" not in res.stdout, res.stdout[-3000:]


def test_gzip_fixture_is_corrupt(env):  # the corrupt-gzip case must fail for its content, not a missing file
    with pytest.raises((OSError, EOFError, zlib.error)):
        with gzip.open(env["bad_gz"], "rt") as fh:
            fh.read()
