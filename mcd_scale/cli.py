"""The input-error convention of every entry point (train.py and tools/*.py).

Bad input — a missing or corrupt file, a checkpoint step that does not exist, a bad flag or config
field — is ONE line on stderr naming the file/field and the fix, exit code 2 (EXIT_CONFIG), on every
rank, no traceback. A traceback is for bugs only, or with ``MCD_DEBUG=1`` in the environment, which
re-raises the input error so its origin is visible.

Raise :class:`~mcd_scale.errors.InputError` (or a subclass: ``ConfigError``, ``IntegrityError``,
``MissingCheckpoint``, the data layer's errors) for input problems (:mod:`mcd_scale.errors`). Entry points wrap their body with :func:`input_errors_exit`.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from mcd_scale.errors import EXIT_CONFIG, ConfigError, InputError, MissingCheckpoint  # noqa: F401 (re-exported)

DEBUG_ENV = "MCD_DEBUG"


def input_error_types() -> tuple:
    """The input-error types every entry point turns into one line and exit 2: :class:`InputError` and its
    subclasses (ConfigError, the data layer's ShardError, ManifestError, TokenizerError, SamplerError,
    IntegrityError, MissingCheckpoint, ...), all defined on :mod:`mcd_scale.errors`' base."""
    return (InputError,)


def rank_prefix() -> str:
    """``[rank r] `` under a multi-process launcher, so every rank's line is attributable."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""


def report(prog: str, exc: BaseException) -> int:
    """Print the one line for an input error and return EXIT_CONFIG."""
    message = " ".join(str(exc).split())  # one line, whatever the message held
    print(f"{rank_prefix()}{prog}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_CONFIG


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def input_errors(*more: type) -> tuple:
    """``except input_errors(FileNotFoundError) as exc: return fail("sample", exc)``: the input-error types
    plus a tool's own (its EvaluateError, or FileNotFoundError where a flag names a path)."""
    return (*input_error_types(), *more)


def fail(prog: str, exc: BaseException) -> int:
    """The one line for an input error, returning EXIT_CONFIG; with MCD_DEBUG=1 the error is raised again
    (its traceback is what a bug report needs)."""
    if debug():
        raise exc
    return report(prog, exc)


@contextmanager
def input_errors_exit(prog: str, *more: type) -> Iterator[None]:
    """``with input_errors_exit("sample"): ...`` turns an input error into its one line + SystemExit(2).
    ``more``: a tool's own input-error types (e.g. its EvaluateError, or FileNotFoundError for a path flag)."""
    try:
        yield
    except (*input_error_types(), *more) as exc:
        if debug():
            raise
        raise SystemExit(report(prog, exc)) from None


# ------------------------------------------------------------------------------------------------
# One argument convention for every tool (docs/cli.md is generated from the parsers built with these).
#
#   --config FILE [FILE ...]   YAML files, later override earlier; repeating --config extends the list
#   --set KEY=VALUE            one config field (repeatable), dest ``overrides``
#   --out PATH                 what the tool writes (a directory, or sample.py's JSONL file)
#   --quiet                    no progress bars/lines
# Old spellings stay accepted as hidden aliases (scripts rely on them): --run-dir for --out,
# --no-progress for --quiet.


def shows_default(action: argparse.Action) -> bool:
    """Whether --help states ``action``'s default: a real value (not None/False/empty), of an option or of
    an optional positional."""
    default = action.default
    if default is None or default is False or default == [] or default is argparse.SUPPRESS:
        return False
    return bool(action.option_strings) or action.nargs in ("?", "*")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Defaults shown once: ``(default: X)`` is appended only when the help does not already say what the
    default is and there is a meaningful one (not None/False/empty). Hidden aliases are left out."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or not shows_default(action):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"

    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = getattr(action, "hidden_aliases", ())
        if hidden and action.option_strings:
            shown = [s for s in action.option_strings if s not in hidden]
            if action.nargs == 0:
                return ", ".join(shown)
            metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
            return ", ".join(f"{s} {metavar}" for s in shown)
        return super()._format_action_invocation(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's formatter and a ONE-line usage error (``prog: error: ... (see --help)``,
    exit 2) instead of the usage block: a bad flag is bad input like any other."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.help is None and shows_default(action):  # argparse prints nothing for a help-less option
            action.help = "(default: %(default)s)"
        return action

    def error(self, message: str):
        print(f"{rank_prefix()}{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)",
              file=sys.stderr, flush=True)
        raise SystemExit(2)


def hide_aliases(action: argparse.Action, *aliases: str) -> argparse.Action:
    """Accept ``aliases`` for ``action`` but leave them out of --help (deprecated spellings)."""
    action.hidden_aliases = tuple(aliases)
    return action


def add_config_args(p: argparse.ArgumentParser, required: bool = False, config_help: str = "",
                    set_help: str = "") -> None:
    """``--config FILE [FILE ...]`` (repeatable: extends) and repeatable ``--set KEY=VALUE`` (dest overrides)."""
    p.add_argument("--config", nargs="+", action="extend", default=[], required=required, metavar="FILE",
                   help=config_help or "YAML config files; later files override earlier ones (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=set_help or "override one config field, e.g. --set parallel.tp=2 (repeatable)")


def add_out_arg(p: argparse.ArgumentParser, help: str, required: bool = False, default=None,
                metavar: str = "DIR", aliases: tuple = ("--run-dir",)) -> argparse.Action:
    """``--out`` (the output path); ``aliases`` (the old ``--run-dir``) stay accepted, hidden from --help."""
    return hide_aliases(p.add_argument("--out", *aliases, dest="out", required=required, default=default,
                                       metavar=metavar, help=help), *aliases)


def add_quiet_arg(p: argparse.ArgumentParser, help: str = "no progress bars or progress lines",
                  dest: str = "quiet") -> argparse.Action:
    """``--quiet``; ``--no-progress`` stays accepted as a hidden alias."""
    return hide_aliases(p.add_argument("--quiet", "--no-progress", dest=dest, action="store_true", help=help),
                        "--no-progress")
