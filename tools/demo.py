#!/usr/bin/env python
"""The end-to-end demo: data -> teachers -> distillation -> sampling -> evaluation -> report.

    .venv/bin/python tools/demo.py [--out runs/demo] [--quick] [--launcher torchrun|deepspeed] [--smollm2]
        [--benchmarks synthetic text] [--synthetic-source chain2|switching] [--teacher-seed N]

The stages, their outputs and how a rerun resumes: :mod:`mcd_scale.demo`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcd_scale.demo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
