"""Checkpoints out of a run: layout-independent weights, consolidation, resharding, the Hugging Face directory."""
