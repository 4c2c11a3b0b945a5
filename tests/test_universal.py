"""Universal-checkpoint rules that need no processes (the multi-rank resumes are in test_train_teacher.py)."""
from __future__ import annotations

import json

from mcd_scale.config import load_config
from mcd_scale.checkpoint.universal import layout_of, native_resume_ok, refuse_reason, saved_layout


def test_saved_layout_reads_the_checkpoint_and_matches_layout_of(tmp_path):
    cfg = load_config(["configs/tiny/teacher.yaml"], ["parallel.tp=2", "parallel.zero_stage=3",
                                                      "train.precision=bf16"])
    from mcd_scale.config import to_yaml

    (tmp_path / "config.resolved.yaml").write_text(to_yaml(cfg))
    (tmp_path / "COMPLETE").write_text(json.dumps({"tag": "step_000003", "world_size": 4}))
    saved = saved_layout(str(tmp_path))
    assert saved == layout_of(cfg.parallel, cfg.train.precision, 4)
    assert saved == {"world_size": 4, "tp": 2, "pp": 1, "zero_stage": 3, "precision": "bf16"}


def test_only_an_fp32_zero0_dp_change_loads_natively():
    """DeepSpeed's ZeRO-0 fp32 optimizer file is per TP/PP rank, so another DP size loads as is (measured:
    DP=2 -> 1 continues the uninterrupted losses); any other change needs universal.safetensors."""
    base = {"world_size": 2, "tp": 1, "pp": 1, "zero_stage": 0, "precision": "fp32"}
    assert native_resume_ok(base, {**base, "world_size": 1})
    assert not native_resume_ok(base, {**base, "world_size": 1, "precision": "bf16"})  # bf16 partitions over DP
    assert not native_resume_ok({**base, "zero_stage": 1}, {**base, "zero_stage": 1, "world_size": 4})
    assert not native_resume_ok(base, {**base, "tp": 2}) and not native_resume_ok(base, {**base, "zero_stage": 3})


def test_ema_runs_are_refused_with_the_fix():
    assert refuse_reason(load_config(["configs/tiny/teacher.yaml"], [])) is None
    msg = refuse_reason(load_config(["configs/tiny/distill.yaml"], ["train.ema_decay=0.999"]))
    assert "train.ema_decay: 0" in msg
