"""One weights-path rule for every tool that reads a trained model (mcd_scale/checkpoint/weights_path.py).

The table below is what each caller accepts: ``sample`` (tools/sample.py, evaluate.py and the demo's
``--checkpoint``, :func:`mcd_scale.inference.resolve_weights`), ``teacher`` (``--teacher`` / ``distill.teacher``,
:func:`mcd_scale.distill.checkpoints.resolve_teacher_file`) and ``convert`` (tools/convert_ckpt.py's inspect,
export, consolidate, reshard, export-hf: :func:`resolve_checkpoint_dir`). A cell is the path the caller resolves to
(relative to the fixture) or the error type and a piece of its one-line message. Cells marked CHANGED differ from
what that caller did before the rule was shared (docs/checkpoints.md, "Which path").
"""
import os

import pytest

from mcd_scale.checkpoint.weights_path import resolve_checkpoint_dir, resolve_weights_path
from mcd_scale.distill.checkpoints import resolve_teacher_file
from mcd_scale.errors import InputError, MissingCheckpoint
from mcd_scale.inference import resolve_weights


def _write(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Runs laid out as the trainer and the exporters write them (file contents do not matter to the rule)."""
    t = str(tmp_path_factory.mktemp("weights_path"))
    for tag in ("step_000001", "step_000002"):
        for name in ("model.safetensors", "model_ema.safetensors", "COMPLETE"):
            _write(os.path.join(t, "run", "checkpoints", tag, name))
    _write(os.path.join(t, "run", "checkpoints", "step_000003", "model.safetensors"))  # no COMPLETE: unfinished
    _write(os.path.join(t, "run", "checkpoints", "latest"), "step_000002\n")
    for name in ("model.safetensors", "COMPLETE", "latest"):  # a checkpoints root copied under another name
        src = os.path.join(t, "run", "checkpoints", name if name == "latest" else os.path.join("step_000002", name))
        with open(src, encoding="utf-8") as fh:
            _write(os.path.join(t, "ckpts", name if name == "latest" else os.path.join("step_000002", name)),
                   fh.read())
    _write(os.path.join(t, "export", "model.safetensors"))
    _write(os.path.join(t, "export", "meta.json"), "{}")
    _write(os.path.join(t, "noconsol", "checkpoints", "step_000001", "COMPLETE"))  # checkpoint.consolidated off
    _write(os.path.join(t, "noconsol", "checkpoints", "latest"), "step_000001")
    _write(os.path.join(t, "badlatest", "checkpoints", "step_000001", "model.safetensors"))
    _write(os.path.join(t, "badlatest", "checkpoints", "latest"), "step_000001")  # names a tag without COMPLETE
    _write(os.path.join(t, "pickled.pt"))
    os.makedirs(os.path.join(t, "empty_dir"))
    return t


S2 = "run/checkpoints/step_000002"
S1 = "run/checkpoints/step_000001"
CALLERS = {
    "sample": lambda p: resolve_weights(p),
    "sample-ema": lambda p: resolve_weights(p, "ema"),
    "teacher": lambda p: resolve_teacher_file(p),
    "teacher-flag": lambda p: resolve_teacher_file(p, what="--teacher"),
    "convert": lambda p: resolve_checkpoint_dir(p),
}
LABEL = {"sample": "--checkpoint", "sample-ema": "--checkpoint", "teacher": "'distill.teacher' =",
         "teacher-flag": "--teacher", "convert": ""}
NOT_DIR = (InputError, "is a file")
MISSING = (MissingCheckpoint, "does not exist")
# input -> {caller: expected}; "all-weights" stands for sample, teacher and teacher-flag.
TABLE = {
    "run": {"all-weights": f"{S2}/model.safetensors", "sample-ema": f"{S2}/model_ema.safetensors", "convert": S2},
    "run/checkpoints": {"all-weights": f"{S2}/model.safetensors", "sample-ema": f"{S2}/model_ema.safetensors",
                        "convert": S2},
    # CHANGED (sample): a checkpoints root not named 'checkpoints' was looked for in ckpts/checkpoints and refused
    "ckpts": {"all-weights": "ckpts/step_000002/model.safetensors", "sample-ema": (MissingCheckpoint, "without EMA"),
              "convert": "ckpts/step_000002"},
    # CHANGED (all): the 'latest' file stands for its directory (sample returned the text file as weights,
    # teacher and convert refused it)
    "run/checkpoints/latest": {"all-weights": f"{S2}/model.safetensors",
                               "sample-ema": f"{S2}/model_ema.safetensors", "convert": S2},
    S1: {"all-weights": f"{S1}/model.safetensors", "sample-ema": f"{S1}/model_ema.safetensors", "convert": S1},
    f"{S1}/model.safetensors": {"all-weights": f"{S1}/model.safetensors",
                                "sample-ema": f"{S1}/model.safetensors", "convert": NOT_DIR},
    "export": {"all-weights": "export/model.safetensors", "sample-ema": (MissingCheckpoint, "no model_ema"),
               "convert": (MissingCheckpoint, "is not a run directory")},
    # a tag without COMPLETE that holds the weights: loaded (verify_file checks what it can), not converted
    "run/checkpoints/step_000003": {"all-weights": "run/checkpoints/step_000003/model.safetensors",
                                    "sample-ema": (MissingCheckpoint, "no model_ema"),
                                    "convert": (MissingCheckpoint, "is not a run directory")},
    # CHANGED (sample): a file other than .safetensors was returned and failed later when parsed
    "pickled.pt": {"all-weights": (InputError, "pickled checkpoints are never loaded"), "convert": NOT_DIR},
    "nowhere": {"all-weights": MISSING, "convert": MISSING},
    # CHANGED (convert): "" read COMPLETE/latest relative to the working directory
    "": {"all-weights": (MissingCheckpoint, "is empty"), "convert": (MissingCheckpoint, "is empty")},
    "empty_dir": {"all-weights": (MissingCheckpoint, "no model.safetensors"),
                  "sample-ema": (MissingCheckpoint, "no model_ema.safetensors"),
                  "convert": (MissingCheckpoint, "is not a run directory")},
    # convert accepts it: consolidate builds the weights from the DeepSpeed shards
    "noconsol": {"all-weights": (MissingCheckpoint, "checkpoint.consolidated: false"),
                 "convert": "noconsol/checkpoints/step_000001"},
    # CHANGED (teacher, convert): a 'latest' naming a tag without COMPLETE was followed
    "badlatest": {"all-weights": (MissingCheckpoint, "is missing or incomplete"),
                  "convert": (MissingCheckpoint, "is missing or incomplete")},
}


def _expected(row: dict, caller: str):
    if caller in row:
        return row[caller]
    return row["all-weights"]


CASES = [(inp, caller) for inp in TABLE for caller in CALLERS]


@pytest.mark.parametrize("inp,caller", CASES, ids=[f"{c}:{i or 'EMPTY'}" for i, c in CASES])
def test_weights_path_table(tree, inp, caller):
    want = _expected(TABLE[inp], caller)
    path = os.path.join(tree, inp) if inp else ""
    if isinstance(want, str):
        assert os.path.normpath(CALLERS[caller](path)) == os.path.normpath(os.path.join(tree, want))
        return
    kind, text = want
    with pytest.raises(kind) as info:
        CALLERS[caller](path)
    msg = str(info.value)
    assert text in msg and "\n" not in msg
    assert isinstance(info.value, InputError)  # every refusal is an input error: one line, exit 2
    if LABEL[caller]:
        assert msg.startswith(LABEL[caller].rstrip(" =")), msg  # names the flag or field the path came from
    if inp:
        assert inp.split("/")[0] in msg  # and the path


def test_missing_paths_stay_file_not_found(tree):
    """Callers that caught FileNotFoundError (the round driver, precompute, sample) still do."""
    for caller in ("sample", "teacher", "convert"):
        with pytest.raises(FileNotFoundError):
            CALLERS[caller](os.path.join(tree, "nowhere"))


def test_unknown_weights_choice_is_refused(tree):
    with pytest.raises(InputError, match="choose one of model, ema"):
        resolve_weights_path(os.path.join(tree, "run"), "raw")
