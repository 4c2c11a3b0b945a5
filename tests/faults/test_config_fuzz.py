"""Config fuzzing (docs/reliability.md, "Fuzzed configs"): generated YAML configs and ``--set`` strings go through
the real entry point, ``mcd_scale.train.main`` with ``--dry-run --layout-only`` (parse, validate, layout, derived
DeepSpeed dict, memory plan), in process for speed, plus a few through the real CLI. Every input must end in
exit 0, or exit 2 with one non-empty line on stderr; any exception escaping ``main`` (a traceback) fails the test
and hypothesis prints the input. CI runs a few hundred inputs; ``tools/dev/faults.py`` (MCD_FAULTS_LONG=1) more.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcd_scale import config as C
from mcd_scale.train import main
from tests.faults import common
from tests.mp import REPO, run_cli

BASE = os.path.join(REPO, "configs", "tiny", "teacher.yaml")
EXAMPLES = 1500 if common.long_variant() else 250
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not common.long_variant(),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SEEN = {"configs": 0, "sets": 0, "exit0": 0, "exit2": 0}


def _fields() -> dict[str, typing.Any]:
    """{'parallel.tp': int, ...} for every leaf of the config tree."""
    out = {}

    def visit(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                visit(tp, prefix + f.name + ".")
            else:
                out[prefix + f.name] = tp
    visit(C.Config, "")
    return out


FIELDS = _fields()
KEYS = sorted(FIELDS)
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in KEYS})
CHOICE_WORDS = sorted({w for opts in C.CHOICES.values() for w in opts})

plain = st.one_of(
    st.integers(min_value=-3, max_value=16),  # mostly plausible sizes: many inputs get past parsing
    st.integers(), st.integers(min_value=10 ** 15, max_value=10 ** 40),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=1e-6, max_value=1.0),
    st.booleans(), st.none(), st.text(max_size=12), st.sampled_from(CHOICE_WORDS),
)
value = st.one_of(plain, st.lists(plain, max_size=3), st.dictionaries(st.text(max_size=6), plain, max_size=2))
key = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), st.sampled_from(SECTIONS),
                st.text(min_size=1, max_size=15),
                st.builds(lambda k, c: k[:-1] + c, st.sampled_from(KEYS), st.characters()))  # typos
raw_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["[", "{a: 1", "1/0", "0/0", "1e400", "-1e400", "nan", ".inf", "~", "''", "0x10", "1_000",
                     "!!python/object/apply:os.system ['echo pwned']", "!!binary AAAA", "*alias", "&a 1",
                     "true", "off", "1/512", "1/", "/2", "[1, 2]", "{}", "- a", "\t", "'\\x00'"]),
    plain.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()),
)


def _nest(dotted: str, v) -> dict:
    out = v
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _merge(a: dict, b: dict) -> dict:
    for k, v in b.items():
        a[k] = _merge(a[k], v) if isinstance(a.get(k), dict) and isinstance(v, dict) else v
    return a


def _run_main(argv: list) -> int:
    """main(argv) with its output captured; asserts the exit contract (0, or 2 with one line)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse on a bad flag
            code = exc.code
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    assert code in (0, 2), (code, argv, err.getvalue()[-2000:])
    if code == 2:
        assert len(lines) == 1 and "error" in lines[0], (argv, err.getvalue()[-2000:])
        SEEN["exit2"] += 1
    else:
        SEEN["exit0"] += 1
    return code


@FUZZ
@given(entries=st.lists(st.tuples(key, value), max_size=6), on_base=st.booleans(), world=st.integers(1, 16),
       garbage=st.one_of(st.none(), st.text(max_size=40)))
def test_generated_config_files_exit_0_or_2(tmp_path_factory, entries, on_base, world, garbage):
    path = tmp_path_factory.mktemp("fuzz", numbered=True) / "cfg.yaml"
    if garbage is not None and not entries:  # a file that may not be YAML at all
        path.write_text(garbage, encoding="utf-8")
    else:
        tree: dict = {}
        for k, v in entries:
            tree = _merge(tree, _nest(k, v))
        path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    files = [BASE, str(path)] if on_base else [str(path)]
    SEEN["configs"] += 1
    _run_main(["--config", *files, "--dry-run", "--layout-only", "--world-size", str(world)])


@FUZZ
@given(sets=st.lists(st.one_of(st.builds(lambda k, r: f"{k}={r}", key, raw_text), st.text(max_size=20)),
                     min_size=1, max_size=4), world=st.integers(1, 8))
def test_generated_set_strings_exit_0_or_2(sets, world):
    argv = ["--config", BASE, "--dry-run", "--layout-only", "--world-size", str(world)]
    for s in sets:
        argv += ["--set", s]
    SEEN["sets"] += 1
    _run_main(argv)


def test_fuzz_figures_recorded():
    """Runs after the two generators (file order): the counts behind docs/reliability.md."""
    if SEEN["configs"] == 0 or SEEN["sets"] == 0:
        pytest.skip("run with the generator tests")
    assert SEEN["exit0"] > 0 and SEEN["exit2"] > 0, SEEN  # both outcomes exercised: the generators reach the checks
    common.record("fuzzed configs", configs=SEEN["configs"], set_strings=SEEN["sets"], exit0=SEEN["exit0"],
                  exit2=SEEN["exit2"], tracebacks=0)


@pytest.mark.parametrize("bad", ["model.hidden=1/0", "parallel.tp=[", "distributed.timeout_s=nan",
                                 "train.steps=!!python/object/apply:os.system ['touch {marker}']", "model=3"])
def test_real_cli_one_line_exit_2(tmp_path, bad):
    marker = tmp_path / "executed"
    res = run_cli([sys.executable, "-m", "mcd_scale.train", "--config", BASE, "--set", bad.format(marker=marker),
                   "--dry-run", "--layout-only", "--world-size", "2"], timeout=120)
    lines = [x for x in res.stdout.splitlines() if x.strip() and "Warning" not in x and "warn" not in x]
    assert res.returncode == 2 and "Traceback" not in res.stdout, res.stdout[-3000:]
    assert len(lines) == 1 and "config error" in lines[0], res.stdout[-3000:]
    assert not marker.exists()
