"""A checkpoint file altered without changing its size (a flipped byte: bit rot, a partial overwrite) is refused by
:func:`mcd_scale.checkpoint.integrity.verify`, naming the file. The other integrity tests truncate files, which the size
check alone already catches; tools/dev/mutate.py's ``integrity-size-only`` (sha256 never compared) survived them."""
from __future__ import annotations

import json
import os

import pytest

from mcd_scale.checkpoint.integrity import MARKER, IntegrityError, record_files, verify


def _tag(tmp_path) -> str:
    tag = tmp_path / "step_000004"
    (tag / "sub").mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 8)
    (tag / "sub" / "universal.safetensors").write_bytes(b"\x01\x02" * 300)
    record = record_files(str(tag))
    (tag / MARKER).write_text(json.dumps({"tag": tag.name, "world_size": 1, "files": record}))
    return str(tag)


@pytest.mark.parametrize("rel", ["mp_rank_00_model_states.pt", os.path.join("sub", "universal.safetensors")])
def test_same_size_alteration_is_refused_naming_the_file(tmp_path, rel):
    tag = _tag(tmp_path)
    assert verify(tag) == "ok"
    path = os.path.join(tag, rel)
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:  # flip one byte in the middle: same size, other content
        fh.seek(size // 2)
        byte = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert os.path.getsize(path) == size
    with pytest.raises(IntegrityError, match="sha256") as exc:
        verify(tag)
    assert path in str(exc.value)
