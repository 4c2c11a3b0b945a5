"""A CPU sanitizer for device mixing: finds host/device mix-ups before a GPU does.

On a CPU machine the host and "the device" are the same memory, so an operation that mixes a host
tensor with a device tensor runs fine in every CPU test and crashes at step 1 on CUDA ("Expected all
tensors to be on the same device"), or silently costs a blocking copy. :class:`DeviceSanitizer` is a
``TorchFunctionMode`` that keeps the distinction on CPU by *tagging* device tensors:

* tagged (device): every ``nn.Parameter``; every tensor that went through
  :func:`mcd_scale.parallel.distributed.to_device` (the one move of a micro-batch) or ``.to(STAND_IN)`` /
  ``.cuda()``, or a ``.to(device)`` / factory with ``device=`` inside third-party code (DeepSpeed's own
  moves, to its accelerator); factories given ``device=STAND_IN``; results of any op with a tagged input; the buffers of
  modules passed to :meth:`DeviceSanitizer.on_device`. ``STAND_IN`` is the run's device (a
  ``torch.device('cpu')`` object recognised by identity): put it in ``ParallelDims.device``; a tagged
  tensor's ``.device`` returns it, so ``torch.zeros(..., device=t.device)`` follows ``t`` as on a GPU;
* untagged (host): everything else -- loader output, keyed CPU draws, ``.cpu()`` / ``.to('cpu')``,
  factories without ``device=`` or with a host device.

An op called from the project's code (``mcd_scale/``, ``tools/``) that mixes a tagged tensor with an untagged
tensor of one or more dimensions is a violation (CUDA accepts host *0-dim* tensors beside device ones, so
those are allowed; a device 0-dim tensor beside a host one is not). Exceptions are legal on CUDA:
``copy_`` and ``.to`` (explicit moves), and a host index into a device tensor (``dev[host_mask]``).
Violations are recorded with the op, the shapes and the project frame that called it;
:meth:`DeviceSanitizer.check` raises :class:`DeviceMixError` listing them. Host-only places that mix on
purpose go in :data:`ALLOWED` with their reason.

Collectives: under NCCL a collective's tensors live on the device, so the sanitizer makes
``collectives.comm_device()`` answer ``STAND_IN`` while it is active.

Limits: third-party code (torch, DeepSpeed, megatron-core) is not checked, only followed; a module never
moved to the device is not seen (its parameters count as device tensors wherever they live).
"""
from __future__ import annotations

import contextlib
import os
import runpy
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode

from mcd_scale.parallel import collectives, distributed

STAND_IN = torch.device("cpu")  # the run's "device"; recognised by identity (torch.device('cpu') is a new object)

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_OURS = tuple(os.path.join(_REPO, d) + os.sep for d in ("mcd_scale", "tools"))
_SELF = os.path.abspath(__file__)
_TAG = "_mcd_on_device"

# (file relative to the repository, function) -> why mixing is right there. Keep it short: every entry is a
# place a GPU run could crash that the sanitizer no longer looks at.
ALLOWED: dict[tuple[str, str], str] = {}

_FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "linspace", "logspace", "eye",
              "rand", "randn", "randint", "randperm", "empty_strided", "zeros_like", "ones_like", "full_like",
              "empty_like", "rand_like", "randn_like", "randint_like", "scalar_tensor", "tril_indices",
              "triu_indices"}
_MOVES = {"to", "cuda", "cpu", "copy_", "pin_memory", "numpy", "tolist", "item", "__get__", "__set__",
          "detach", "requires_grad_", "retain_grad", "register_hook", "backward", "data_ptr", "untyped_storage"}
_INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put", "index_select", "gather", "scatter",
             "scatter_", "masked_fill", "masked_fill_", "take_along_dim", "index_add_", "index_copy_"}


class DeviceMixError(AssertionError):
    """Ops of the project's code mixed host and device tensors (the message lists each)."""


@dataclass(frozen=True)
class Violation:
    op: str
    where: str  # file:line in function() of the project's frame that called the op
    device_shapes: tuple
    host_shapes: tuple

    def __str__(self) -> str:
        return (f"{self.where}: {self.op} mixes device tensor(s) {list(self.device_shapes)} with host tensor(s) "
                f"{list(self.host_shapes)}")


def is_tagged(t: torch.Tensor) -> bool:
    return isinstance(t, torch.nn.Parameter) or bool(getattr(t, _TAG, False))


def _set_tag(t: Any, on_device: bool) -> None:
    if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
        try:
            setattr(t, _TAG, on_device)
        except (AttributeError, RuntimeError):
            pass


def tag(obj: Any, on_device: bool = True) -> Any:
    """Mark every tensor in ``obj`` (nested tuples/lists/dicts/dataclass-like objects) as device (or host)."""
    if isinstance(obj, torch.Tensor):
        _set_tag(obj, on_device)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            tag(v, on_device)
    elif isinstance(obj, dict):
        for v in obj.values():
            tag(v, on_device)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for v in vars(obj).values():
            if isinstance(v, (torch.Tensor, list, tuple, dict)):
                tag(v, on_device)
    return obj


def _tensors(obj: Any, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    return out


def _caller() -> Optional[tuple[str, int, str]]:
    """(path, line, function) of the first frame outside torch and this module, if it is the project's code."""
    f = sys._getframe(2)
    while f is not None:
        path = f.f_code.co_filename
        if path != _SELF and f"{os.sep}torch{os.sep}" not in path:
            return (path, f.f_lineno, f.f_code.co_name) if path.startswith(_OURS) else None
        f = f.f_back
    return None


def _target_of_to(args: tuple, kwargs: dict) -> Optional[bool]:
    """For ``Tensor.to``: True (to the device), False (to the host) or None (a dtype-only cast)."""
    candidates = list(args[1:]) + [kwargs.get("device")] + ([kwargs["other"]] if "other" in kwargs else [])
    for a in candidates:
        if a is STAND_IN:
            return True
        if isinstance(a, torch.Tensor):
            return is_tagged(a)
        if isinstance(a, torch.device):
            return a.type != "cpu"
        if isinstance(a, str):
            try:
                return torch.device(a).type != "cpu"
            except RuntimeError:
                continue
        if isinstance(a, int) and not isinstance(a, bool):
            return True  # a CUDA ordinal
    return None


def _moved(out: torch.Tensor, src: torch.Tensor, on_device: bool) -> torch.Tensor:
    """``out`` of a move of ``src`` tagged ``on_device``. On CPU a move returns ``src`` itself; when the side
    changes, an alias stands for the moved copy so ``src`` keeps its own side (as it would on a GPU)."""
    if isinstance(out, torch.nn.Parameter) or is_tagged(out) == on_device:
        return out
    if out is src:
        out = out.view_as(out)
    _set_tag(out, on_device)
    return out


def _moved_tree(obj: Any) -> Any:
    """Every tensor of a nested tuple/list/dict as its device-side alias (what to_device returns on a GPU)."""
    if isinstance(obj, torch.Tensor):
        return _moved(obj, obj, True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_moved_tree(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _moved_tree(v) for k, v in obj.items()}
    return obj


class DeviceSanitizer(TorchFunctionMode):
    """See the module docstring. Use as a context manager; :meth:`check` raises on recorded violations."""

    def __init__(self, allowed: Optional[dict] = None):
        super().__init__()
        self.allowed = dict(ALLOWED if allowed is None else allowed)
        self.violations: list[Violation] = []
        self.ops_checked = 0
        self._patches: list = []

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def on_device(module: torch.nn.Module) -> torch.nn.Module:
        """Mark a module's buffers as device tensors (its parameters always are)."""
        for b in module.buffers():
            _set_tag(b, True)
        return module

    def __enter__(self):
        original_to_device = distributed.to_device

        def to_device(obj, device):
            return _moved_tree(original_to_device(obj, device))

        self._patch(distributed, "to_device", to_device)
        for name, module in list(sys.modules.items()):  # modules that imported it by name
            if name.startswith(("mcd_scale.", "tools.")) and getattr(module, "to_device", None) is original_to_device:
                self._patch(module, "to_device", to_device)
        self._patch(collectives, "comm_device", lambda group=None: STAND_IN)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for module, name, old in reversed(self._patches):
                setattr(module, name, old)
            self._patches.clear()

    def _patch(self, module, name: str, value) -> None:
        self._patches.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    # ------------------------------------------------------------------ the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__" and getattr(func, "__self__", None) is torch.Tensor.device:
            t = args[0]
            return STAND_IN if is_tagged(t) else func(*args, **kwargs)
        inputs = _tensors(args, []) + _tensors(kwargs, [])
        if name not in _MOVES and inputs:
            self._check(name, args, inputs)
        out = func(*args, **kwargs)
        if name in _FACTORIES and not name.endswith("_like"):
            dev = kwargs.get("device")
            # device=STAND_IN (or a tagged tensor's .device) is the device; third-party code's own device= is its
            # accelerator's (DeepSpeed's buffers); anything else is the host.
            tag(out, dev is STAND_IN or (dev is not None and _caller() is None))
            return out
        if name in ("to", "cuda", "cpu", "pin_memory") and isinstance(out, torch.Tensor):
            src = args[0]
            if name == "to":
                target = _target_of_to(args, kwargs)
                if target is False and _caller() is None:
                    target = True  # third-party code's .to(its accelerator) (DeepSpeed's pipeline loading labels)
                on_device = is_tagged(src) if target is None else target
            else:
                on_device = name == "cuda" or (name == "pin_memory" and is_tagged(src))
            return _moved(out, src, on_device)
        if (name.endswith("_") and not name.endswith("__")) or name in ("__setitem__", "__set__", "backward"):
            return out  # in place: the written tensor keeps its own side
        if any(is_tagged(t) for t in inputs):
            tag(out, True)
        return out

    def _check(self, name: str, args: tuple, inputs: list) -> None:
        device = [t for t in inputs if is_tagged(t)]
        if not device:
            return
        if name in _INDEXING and args and isinstance(args[0], torch.Tensor) and is_tagged(args[0]):
            # dev[host_index] (= value) is legal on CUDA (the index is copied); only a host value written into
            # a device tensor is not.
            value = args[2] if name == "__setitem__" and len(args) > 2 else None
            host = [v for v in _tensors(value, []) if not is_tagged(v) and v.dim() > 0]
        else:
            host = [t for t in inputs if not is_tagged(t) and t.dim() > 0]
        if not host:
            return
        where = _caller()
        if where is None:
            return
        self.ops_checked += 1
        path, line, fn = where
        rel = os.path.relpath(path, _REPO)
        if (rel, fn) in self.allowed:
            return
        self.violations.append(Violation(name, f"{rel}:{line} in {fn}()", tuple(tuple(t.shape) for t in device),
                                         tuple(tuple(t.shape) for t in host)))

    def check(self) -> None:
        if self.violations:
            seen, lines = set(), []
            for v in self.violations:
                if str(v) not in seen:
                    seen.add(str(v))
                    lines.append(str(v))
            raise DeviceMixError(f"{len(self.violations)} device-mixing op(s) ({len(lines)} distinct):\n"
                                 + "\n".join(lines[:40]))


@contextlib.contextmanager
def sanitized(allowed: Optional[dict] = None) -> Iterator[DeviceSanitizer]:
    """``with sanitized() as s: ...`` -- raises :class:`DeviceMixError` at the end if anything mixed."""
    s = DeviceSanitizer(allowed)
    with s:
        yield s
    s.check()


def main(argv: Optional[list] = None) -> int:
    """``python -m mcd_scale.testing.device_sanitizer SCRIPT.py ARGS`` or ``... -m MODULE ARGS``: run a tool or
    an entry point under the sanitizer (from before its process group starts, so its ``dims.device`` is the
    stand-in). Exit 3 with the violations on stderr if anything mixed, else the program's own exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        print("usage: python -m mcd_scale.testing.device_sanitizer (SCRIPT.py | -m MODULE) [ARGS...]", file=sys.stderr)
        return 2
    module = argv[1] if argv[0] == "-m" else None
    prog_args = argv[2:] if module else argv[1:]
    sys.argv = [module or argv[0], *prog_args]
    code = 0
    sanitizer = DeviceSanitizer()
    with sanitizer:
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
                runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    try:
        sanitizer.check()
    except DeviceMixError as exc:
        print(f"device sanitizer: {exc}", file=sys.stderr, flush=True)
        return 3
    print(f"device sanitizer: no device mixing ({sanitizer.ops_checked} mixed-side ops seen, all allowed)",
          file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
