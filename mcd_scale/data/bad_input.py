"""A bad sample found mid-run stops EVERY rank with exit 2 and one line, not only the rank that read it.

Why not raise where the sample is read: the rank's peers are by then in the step's gradient reduction and fail
there with the backend's error (exit 1, a traceback) after up to ``distributed.timeout_s``. Instead the loader
stands a readable sample in for the bad one and hands the error line on with the micro-batch
(mcd_scale/data/loader.py, ``bad_input``), so the step that consumes it runs its usual collectives on every
rank. The flag rides on the step's one collective (mcd_scale/training/engine.py, mcd_scale/training/nonfinite.py); once every
rank knows, before the optimizer update, each raises here: the reading rank its own line, every other rank
``stopping: rank M hit a bad input: <that line>``. Only this failure path exchanges the text (one more
collective, on a step that does not train).
"""
from __future__ import annotations

from typing import NoReturn, Optional

from mcd_scale.parallel import collectives
from mcd_scale.errors import InputError


class BadInput(InputError):
    """A rank read an unreadable sample at this step (the message names its shard, key and the fix)."""


def of_step(micro_batches: list) -> Optional[str]:
    """The first error line carried by this rank's micro-batches of the step (None: all samples read)."""
    return next((mb["bad_input"] for mb in micro_batches if mb.get("bad_input")), None)


def stop_every_rank(own: Optional[str]) -> NoReturn:
    """Called on every rank once the step's collective said some rank had a bad input: raise the one line."""
    lines = collectives.all_gather_object(own)
    if own is not None:
        raise BadInput(own)
    first = next(r for r, line in enumerate(lines) if line is not None)
    raise BadInput(f"stopping: rank {first} hit a bad input: {lines[first]}")
