"""The ``--device`` flag of our single-process tools (sample, benches, gpu_check): one rule, one message.

Default: ``cuda`` when CUDA is present, else ``cpu``. A value torch cannot parse, or a CUDA device on
a machine without CUDA (or without that index), is bad input: :class:`DeviceFlagError` carries the one
line the tool prints before exiting with code 2.
"""
from __future__ import annotations

import torch


class DeviceFlagError(ValueError):
    """A --device value that cannot be used on this machine (message names the flag and the fix)."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(value: str | None) -> torch.device:
    """``value`` (None: :func:`default_device`) as a usable torch.device, or DeviceFlagError."""
    value = value or default_device()
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise DeviceFlagError(f"--device {value!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceFlagError(f"--device {value}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceFlagError(f"--device {value}: this machine has {torch.cuda.device_count()} CUDA "
                                  f"device(s); use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise DeviceFlagError(f"--device {value}: only cpu and cuda are supported")
    return device
