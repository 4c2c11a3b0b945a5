#!/usr/bin/env python
"""Run the rounds of a distillation (MCD, or the SDTT baseline): round n's student is round n+1's teacher.

Every step and flag: :mod:`mcd_scale.distill.driver` (``--help``).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcd_scale.distill.driver import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(process_entry=True))
