"""DeepSpeed's checkpoint files loaded with weights_only=True and an explicit allowlist (every layout we write:
ZeRO-1/3, fp32/bf16, the pipeline menu), a planted pickle payload refused, and the integrity hashing split
over the ranks (save and resume)."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from mcd_scale.checkpoint import integrity
from mcd_scale.checkpoint.deepspeed_files import UnsafeCheckpointFile, safe_load
from tests.mp import REPO, run_ranks


class _Payload:
    """What a hostile .pt file holds: unpickling it would run a shell command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_payload(path: str, marker: str) -> None:
    torch.save({"module": {"w": torch.zeros(2)}, "x": _Payload(marker)}, path)


def test_a_planted_pickle_payload_is_refused_naming_the_file(tmp_path):
    path, marker = str(tmp_path / "mp_rank_00_model_states.pt"), str(tmp_path / "pwned")
    plant_payload(path, marker)
    with pytest.raises(UnsafeCheckpointFile, match=r"mp_rank_00_model_states\.pt: refused to unpickle"):
        safe_load(path)
    assert not os.path.exists(marker)
    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, path)  # tensors and plain values load
    assert safe_load(path)["step"] == 3


def test_hashing_shares_cover_every_file_once_balanced_by_bytes(tmp_path, monkeypatch):
    sizes = {"big0.pt": 9000, "big1.pt": 8000, "a.json": 10, "b.safetensors": 700, "sub/c.pt": 3000, "d": 1}
    for name, size in sizes.items():
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_bytes(os.urandom(size))
    whole = integrity.record_files(str(tmp_path))
    parts = [integrity.record_files(str(tmp_path), share=(r, 3)) for r in range(3)]
    assert sorted(k for p in parts for k in p) == sorted(whole) and {k: v for p in parts for k, v in p.items()} == whole
    loads = [sum(sizes[k] for k in p) for p in parts]
    assert max(loads) <= 9000 + 10  # the largest file alone bounds the slowest rank
    (tmp_path / integrity.MARKER).write_text(json.dumps({"files": whole}))
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(os.path.relpath(p, tmp_path)) or real(p))
    for r in range(3):
        assert integrity.verify(str(tmp_path), share=(r, 3)) == "ok"
    assert sorted(hashed) == sorted(whole)  # each file hashed once over the three ranks
    (tmp_path / "big1.pt").write_bytes(os.urandom(8000))
    bad = [r for r in range(3) if _fails(tmp_path, r)]
    assert len(bad) == 1  # exactly the rank whose share holds the altered file sees it


def _fails(path, r) -> bool:
    try:
        integrity.verify(str(path), share=(r, 3))
        return False
    except integrity.IntegrityError:
        return True


LAYOUTS = {  # name: (overrides, resume through DeepSpeed's loader in this test)
    "zero3_fp32": (["parallel.zero_stage=3", "train.precision=fp32"], False),
    "zero3_bf16": (["parallel.zero_stage=3", "train.precision=bf16"], True),
    "zero1_bf16": (["parallel.zero_stage=1", "train.precision=bf16"], False),
    "pipeline_bf16": (["parallel.zero_stage=1", "parallel.pp=2", "train.precision=bf16"], True),
}


def save_and_resume_layouts(root: str) -> dict:
    """One rank: a 1-step run of every layout with a checkpoint; every DeepSpeed file of it through safe_load;
    two layouts resumed (Trainer -> DeepSpeed load_checkpoint through the safe loader); then a forged tag (a
    payload with a matching integrity record) refused on resume."""
    from mcd_scale.checkpoint.integrity import record_files
    from mcd_scale.config import load_config
    from mcd_scale.parallel import collectives
    from mcd_scale.parallel.distributed import ParallelDims, init_distributed
    from mcd_scale.training.trainer import Trainer
    from tests.test_device_sanitizer import TINY, _write_tokens

    current = {}

    def layout(pp: int):  # the process group once; megatron's groups rebuilt when the layout changes
        if current.get("pp") != pp:
            current["dims"] = init_distributed(1, pp) if not current else ParallelDims.build(tp=1, pp=pp)
            current["pp"] = pp
        return current["dims"]

    out = {"loaded": {}, "resumed": {}}
    if int(os.environ["RANK"]) == 0:
        _write_tokens(os.path.join(root, "tokens"), 61, 16)

    def cfg_of(name, extra, *more):
        pp = 2 if "parallel.pp=2" in extra else 1
        return load_config([os.path.join(REPO, "configs/tiny/teacher.yaml")], TINY + [
            f"data.path={root}/tokens", f"run.dir={root}/{name}", "data.num_workers=0", "train.eval_every=0",
            "parallel.micro_batch=2", "parallel.global_batch=4", "parallel.tp=1", f"parallel.pp={pp}",
            "logging.tensorboard=false", "train.ema_decay=0", "train.log_every=1", *extra, *more])

    for name, (extra, resume) in LAYOUTS.items():
        d = layout(2 if "parallel.pp=2" in extra else 1)
        collectives.barrier()
        assert Trainer(cfg_of(name, extra, "train.steps=1"), d).fit() == 0
        tag = glob.glob(os.path.join(root, name, "checkpoints", "step_*"))[0]
        files = sorted(glob.glob(os.path.join(tag, "*.pt")))
        out["loaded"][name] = [os.path.basename(f) for f in files if safe_load(f) is not None]
        if resume:
            trainer = Trainer(cfg_of(name, extra, "train.steps=2", "checkpoint.load=latest"), d)
            out["resumed"][name] = (trainer.state.step, trainer.fit())
    # The forged tag: a payload in place of the optimizer files, its integrity record rewritten to match.
    name = "zero3_bf16"
    tag = sorted(glob.glob(os.path.join(root, name, "checkpoints", "step_*")))[-1]
    collectives.barrier()
    if collectives.rank() == 0:
        for victim in glob.glob(os.path.join(tag, "*optim_states.pt")):  # every rank's (each loads its own)
            plant_payload(victim, os.path.join(root, "pwned"))
        with open(os.path.join(tag, "COMPLETE"), encoding="utf-8") as fh:
            marker = json.load(fh)
        marker["files"] = record_files(tag)
        with open(os.path.join(tag, "COMPLETE"), "w", encoding="utf-8") as fh:
            json.dump(marker, fh)
    collectives.barrier()
    try:
        Trainer(cfg_of(name, LAYOUTS[name][0], "train.steps=3", "checkpoint.load=latest"), layout(1))
        out["forged"] = "loaded"
    except UnsafeCheckpointFile as exc:
        out["forged"] = str(exc)
    out["payload_ran"] = os.path.exists(os.path.join(root, "pwned"))
    return out


def test_every_layout_we_write_loads_weights_only_and_a_forged_tag_is_refused(tmp_path):
    results = run_ranks("tests.test_checkpoint_safe_load:save_and_resume_layouts", world_size=2,
                        kwargs={"root": str(tmp_path)}, timeout=300)
    for rank, res in enumerate(results):
        assert set(res["loaded"]) == set(LAYOUTS) and all(res["loaded"].values()), (rank, res["loaded"])
        assert res["resumed"] == {"zero3_bf16": (1, 0), "pipeline_bf16": (1, 0)}, (rank, res["resumed"])
        assert "refused to unpickle" in res["forged"] and not res["payload_ran"], (rank, res)
    assert any("optim_states" in f for f in results[0]["loaded"]["zero3_bf16"])
    assert any(f.startswith("layer_") for f in results[0]["loaded"]["pipeline_bf16"])
