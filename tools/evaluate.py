#!/usr/bin/env python
"""Score generated samples and write the evaluation report (quality, entropy, speed, matched entropy).

The entry point only: every flag, the row format and the logic live in mcd_scale/eval/evaluate.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcd_scale.eval.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
