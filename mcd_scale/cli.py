"""The input-error convention of every entry point (train.py and tools/*.py).

Bad input — a missing or corrupt file, a checkpoint step that does not exist, a bad flag or config
field — is ONE line on stderr naming the file/field and the fix, exit code 2 (EXIT_CONFIG), on every
rank, no traceback. A traceback is for bugs only, or with ``MCD_DEBUG=1`` in the environment, which
re-raises the input error so its origin is visible.

Raise :class:`InputError` (or a subclass: ``IntegrityError``, ``MissingCheckpoint``) for input
problems; ``ConfigError`` is one as well. Entry points wrap their body with :func:`input_errors_exit`.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

DEBUG_ENV = "MCD_DEBUG"


class InputError(ValueError):
    """Bad input of an entry point. The message names the file or field and the fix."""


class MissingCheckpoint(InputError, FileNotFoundError):
    """A checkpoint tag asked for (``checkpoint.load``, ``latest``) does not exist or is incomplete."""


def input_error_types() -> tuple:
    """InputError, ConfigError and the data layer's own input errors (a corrupt shard, a bad manifest or
    tokenizer file): all name their file."""
    import importlib

    from mcd_scale.config import ConfigError

    types = [InputError, ConfigError]
    for module, name in (("mcd_scale.data.shards", "ShardError"), ("mcd_scale.data.manifest", "ManifestError"),
                         ("mcd_scale.data.tokenizer", "TokenizerError"), ("mcd_scale.data.sampler", "SamplerError")):
        try:
            types.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # the data layer is being reorganised: keep what exists
            pass
    return tuple(types)


def rank_prefix() -> str:
    """``[rank r] `` under a multi-process launcher, so every rank's line is attributable."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""


def report(prog: str, exc: BaseException) -> int:
    """Print the one line for an input error and return EXIT_CONFIG."""
    from mcd_scale import EXIT_CONFIG

    message = " ".join(str(exc).split())  # one line, whatever the message held
    print(f"{rank_prefix()}{prog}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_CONFIG


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextmanager
def input_errors_exit(prog: str) -> Iterator[None]:
    """``with input_errors_exit("sample"): ...`` turns an input error into its one line + SystemExit(2)."""
    try:
        yield
    except input_error_types() as exc:
        if debug():
            raise
        raise SystemExit(report(prog, exc)) from None
