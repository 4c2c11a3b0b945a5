"""Exit codes and the input-error types of every entry point. Imports nothing from the package, so every layer
can raise these without reaching upward (docs/architecture.md, "Layering").

Bad input — a missing or corrupt file, a checkpoint step that does not exist, a bad flag or config field — is an
:class:`InputError` (or a subclass) whose message names the file or field and the fix; the entry points turn it
into ONE line on stderr and exit code :data:`EXIT_CONFIG` (:mod:`mcd_scale.cli`).
"""
from __future__ import annotations

# Exit codes are API (SLURM scripts and drivers branch on them).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2      # bad config / input: fix and resubmit, do not requeue
EXIT_DIVERGED = 3    # too many non-finite losses in a row
EXIT_PREEMPTED = 4   # SIGTERM/SIGUSR1 received: checkpoint written, requeue


class InputError(ValueError):
    """Bad input of an entry point. The message names the file or field and the fix."""


class MissingCheckpoint(InputError, FileNotFoundError):
    """A checkpoint tag asked for (``checkpoint.load``, ``latest``) does not exist or is incomplete."""


class ConfigError(InputError):
    """A configuration problem. The message names the field (or file) and the fix.

    Always one line: a key, value or file name quoted in the message may hold a newline or another control
    character (found by config fuzzing, tests/faults/test_config_fuzz.py); those are shown escaped."""

    def __init__(self, message: str = "") -> None:
        super().__init__("".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                                 for ch in str(message)))
