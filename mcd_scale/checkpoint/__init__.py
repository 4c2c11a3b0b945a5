"""Checkpoints: atomic store, integrity, universal (layout-free) form, consolidation, conversion worker, HF export."""
