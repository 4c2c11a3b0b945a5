"""docs/cli.md is what the parsers print (drift test, like docs/config.md's), and every entry point follows
the one CLI convention of mcd_scale/cli.py: ``--config FILE [FILE ...]`` (repeatable), repeatable
``--set KEY=VALUE``, ``--out``, ``--quiet``, each default shown once, old spellings still parsed."""
from __future__ import annotations

import argparse
import importlib.util
import os
import re

import pytest

from tests.mp import REPO


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", os.path.join(REPO, "tools", "dev", "gen_cli_docs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def parsers(gen):
    return {rel: gen.parser_of(rel) for rel in gen.TOOLS}


def test_docs_cli_md_is_generated_from_the_parsers(gen):
    path = os.path.join(REPO, "docs", "cli.md")
    assert os.path.isfile(path), "docs/cli.md is missing: run `.venv/bin/python tools/dev/gen_cli_docs.py`"
    with open(path, encoding="utf-8") as fh:
        current = fh.read()
    assert current == gen.render(), "docs/cli.md is out of date: run `.venv/bin/python tools/dev/gen_cli_docs.py`"
    assert REPO not in current  # no machine-specific path in the page


def _option(parser: argparse.ArgumentParser, flag: str):
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_config_and_set_follow_one_form(parsers):
    seen = 0
    for rel, p in parsers.items():
        config, sets = _option(p, "--config"), _option(p, "--set")
        if config is not None:
            seen += 1
            assert config.nargs == "+" and isinstance(config, argparse._ExtendAction), rel  # FILE [FILE ...], repeatable
        if sets is not None:
            assert isinstance(sets, argparse._AppendAction) and sets.dest == "overrides", rel
    assert seen >= 4  # train, precompute, distill_rounds, sample


def test_one_name_for_output_and_quiet_old_names_still_parse(gen, parsers):
    for rel, p in parsers.items():
        text = gen.help_text(p)
        assert "--run-dir" not in text.split("options:")[-1] and "--no-progress" not in text, rel
        assert _option(p, "--progress") is None, rel
    for rel in ("tools/distill_rounds.py", "tools/evaluate.py", "tools/demo.py"):  # had --run-dir: same action
        assert _option(parsers[rel], "--run-dir") is _option(parsers[rel], "--out") is not None, rel
    for rel in ("tools/prepare_data.py", "tools/precompute_trajectories.py"):  # had --no-progress: same action
        assert _option(parsers[rel], "--no-progress") is _option(parsers[rel], "--quiet") is not None, rel
    assert _option(parsers["tools/sample.py"], "--quiet") is not None


def test_defaults_are_shown_once(gen, parsers):
    for rel, p in parsers.items():
        for block in re.split(r"\n(?=  -)", gen.help_text(p)):  # one option's help block
            assert len(re.findall(r"\(default", block)) <= 1, f"{rel}: {block}"
    prep = gen.help_text(parsers["tools/prepare_data.py"])
    assert re.search(r"--val-frac VAL_FRAC\s+\(default: 0\.05\)", prep), prep  # an option without help text too
