"""Hugging Face-style export (``tools/convert_ckpt.py export-hf``): ``modeling_mcd.py`` is copied into the
exported directory and loaded by ``transformers`` with ``trust_remote_code=True``; it imports only torch
and transformers, never mcd_scale."""
