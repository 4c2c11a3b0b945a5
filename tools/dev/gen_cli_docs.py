#!/usr/bin/env python
"""Generate docs/cli.md from the entry points' own argument parsers (``--check``: exit 1 when it drifted).

    .venv/bin/python tools/dev/gen_cli_docs.py            # rewrite docs/cli.md
    .venv/bin/python tools/dev/gen_cli_docs.py --check    # what tests/test_cli_docs.py asserts

Each tool's parser is captured by calling its ``main`` with ``parse_args`` intercepted (nothing runs:
every entry point parses its arguments first), so the page is exactly what ``--help`` prints, at a fixed
width. Subcommands (``convert_ckpt.py inspect`` ...) get their own block.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
OUT = os.path.join(REPO, "docs", "cli.md")
WIDTH = "100"  # COLUMNS for argparse: the page must not depend on the terminal it was generated in

# The user-facing entry points, in pipeline order (README "Entry points").
TOOLS = ["mcd_scale/train.py", "tools/prepare_data.py", "tools/precompute_trajectories.py", "tools/distill_rounds.py",
         "tools/sample.py", "tools/evaluate.py", "tools/convert_ckpt.py", "tools/demo.py", "tools/ideal_rows.py"]

CONVENTIONS = """\
Every tool follows one convention (helpers in `mcd_scale/cli.py`):

| what | flag | notes |
|---|---|---|
| config files | `--config FILE [FILE ...]` | later files override earlier ones; repeating `--config` extends the list |
| one config field | `--set KEY=VALUE` | repeatable, applied after the files |
| output | `--out PATH` | a directory (sample.py: a JSONL file) |
| progress | `--quiet` | no progress bars or lines |
| help | `--help` | each default is shown once, as `(default: X)` or in the text |

Bad input (a missing or corrupt file, a checkpoint step that does not exist, a bad tokenizer, a bad flag
or config field) is ONE line on stderr, `PROG: error: ...` naming the file or field and the fix, exit
code 2, on every rank, no traceback; `MCD_DEBUG=1` in the environment shows the traceback instead.
Exit codes: `0` done, `1` error (a bug: traceback), `2` bad input, `3` diverged, `4` preempted.
Plain `torchrun` exits 1 whatever its ranks returned: launch with `.venv/bin/python -m mcd_scale.torchrun`
(same options, exits with the first failed rank's code), `srun`, `mpirun` or the `deepspeed` launcher
when a script must tell bad input from a crash; `train.py --dry-run` checks a config and its input
paths without starting anything (README, Entry points).
"""


def load_main(rel: str):
    """The ``main`` of an entry point (tools/ is not a package: loaded by path, once)."""
    if rel == "mcd_scale/train.py":
        from mcd_scale.train import main
        return main
    name = "_cli_doc_" + os.path.splitext(os.path.basename(rel))[0]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, rel))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        with warnings.catch_warnings():  # megatron's import-time notes about optional fused kernels
            warnings.simplefilter("ignore")
            spec.loader.exec_module(mod)
    return sys.modules[name].main


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


@contextmanager
def _intercept_parse() -> Iterator[None]:
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def parser_of(rel: str) -> argparse.ArgumentParser:
    """The top-level parser ``rel``'s main builds (its first parse_args call)."""
    main = load_main(rel)
    with _intercept_parse():
        try:
            main([])
        except _Captured as got:
            return got.parser
    raise RuntimeError(f"{rel}: main() returned without parsing its arguments")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def help_text(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        text = parser.format_help().rstrip() + "\n"
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return text.replace(REPO + os.sep, "")  # defaults under the checkout print as repo-relative paths


def hidden_aliases(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(old spelling, current flag) of the deprecated aliases a parser still accepts."""
    out = []
    for action in parser._actions:
        for alias in getattr(action, "hidden_aliases", ()):
            out.append((alias, next(s for s in action.option_strings if s not in action.hidden_aliases)))
    return out


def render() -> str:
    lines = ["# Command-line reference", "",
             "<!-- generated by tools/dev/gen_cli_docs.py from the parsers; do not edit by hand -->", "",
             "Generated from the entry points' own parsers by `tools/dev/gen_cli_docs.py` "
             "(`tests/test_cli_docs.py` fails when this page and the parsers disagree). Run every command with "
             "the project's interpreter, `.venv/bin/python` (or after `source .venv/bin/activate`).", "",
             "## Conventions", "", CONVENTIONS.rstrip(), ""]
    aliases = []
    blocks = []
    for rel in TOOLS:
        parser = parser_of(rel)
        blocks += [f"## `{rel}`", "", "```text", help_text(parser).rstrip(), "```", ""]
        aliases += [(rel, old, new) for old, new in hidden_aliases(parser)]
        for name, sub in subparsers(parser).items():
            blocks += [f"### `{rel} {name}`", "", "```text", help_text(sub).rstrip(), "```", ""]
            aliases += [(f"{rel} {name}", old, new) for old, new in hidden_aliases(sub)]
    if aliases:
        lines += ["Deprecated spellings, still accepted (scripts rely on them), not shown by `--help`:", "",
                  "| tool | old | use |", "|---|---|---|"]
        lines += [f"| `{tool}` | `{old}` | `{new}` |" for tool, old, new in aliases]
        lines.append("")
    return "\n".join(lines + blocks).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/dev/gen_cli_docs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md differs from the generated text")
    p.add_argument("--out", default=OUT, help="output path (default: docs/cli.md)")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        try:
            with open(args.out, encoding="utf-8") as fh:
                same = fh.read() == text
        except FileNotFoundError:
            same = False
        if not same:
            print(f"{args.out} is out of date: run `.venv/bin/python tools/dev/gen_cli_docs.py`", file=sys.stderr)
            return 1
        return 0
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
