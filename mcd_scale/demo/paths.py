"""Where the demo finds the checkout it runs in (configs/demo/, tools/, the venv's launchers)."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The repository checkout: the demo runs its stages' entry points (tools/*.py) and configs from here."""
BIN = os.path.dirname(sys.executable)
"""The interpreter's bin directory: torchrun and the deepspeed launcher of this venv."""
