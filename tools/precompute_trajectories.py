#!/usr/bin/env python
"""Precompute one distillation round's coupled trajectories + frozen-teacher top-k targets (docs/method.md).

The entry point only (also under the launchers: torchrun, deepspeed, srun, mpirun): every flag and the job
itself live in mcd_scale/training/precompute.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcd_scale.training.precompute import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(process_entry=True))  # the preemption handlers stay installed until the process exits
