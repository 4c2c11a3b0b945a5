"""The model loader and sampler of ``tools/sample.py``, loaded by path until they move into the package.

The one place the package reaches into tools/ (tests/test_layering.py KNOWN_BRIDGES): the demo's sampling stage and
the ideal rows' trained teacher load checkpoints through it. Delete it when ``mcd_scale`` has its own loader.
"""
from __future__ import annotations

import importlib.util
import os
import sys

_NAME = "_mcd_scale_tools_sample"
_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools",
                     "sample.py")


def tools_sampler():
    """tools/sample.py as a module (``load_model``, ``sample``, ``decode_rows``, ``resolve_weights``), loaded once."""
    if _NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(_NAME, _PATH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = mod
        spec.loader.exec_module(mod)
    return sys.modules[_NAME]
