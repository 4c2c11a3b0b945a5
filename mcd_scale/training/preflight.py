"""Input checks of a training launch, run on every rank before any process group or model exists.

So a missing data path, teacher, trajectory directory or checkpoint step is one line within seconds
(``train.py --dry-run`` runs the same checks and reports ``ok`` only when they pass), and a failed
launch writes nothing into the run directory. Raises InputError / ConfigError / the data layer's errors.
"""
from __future__ import annotations

import os

from mcd_scale.errors import InputError


def check_inputs(cfg, verify_checkpoint: bool = False) -> dict:
    """What the launch will read, checked; returns {what: path} for the dry-run report."""
    # lazy: loads torch, webdataset; importing this module does not need them
    from mcd_scale.checkpoint.store import checkpoint_root, resolve_load_tag, verify_tag
    from mcd_scale.data.loader import open_prepared

    checked: dict = {}
    m = cfg.model
    if not os.path.isdir(cfg.data.path):
        raise InputError(f"'data.path' = {cfg.data.path}: no such directory; run tools/prepare_data.py --out "
                         f"{cfg.data.path} or set data.path")
    offline = cfg.train.objective == "mcd" and cfg.distill.teacher_mode == "offline"
    for split in (("val",) if offline else ("train", "val")):
        open_prepared(cfg.data.path, split, vocab_size=m.vocab_size, seq_len=m.seq_len)
    checked["data"] = cfg.data.path
    if offline:
        traj = cfg.data.trajectories
        if not traj or not os.path.isdir(traj):
            raise InputError(f"'data.trajectories' = {traj or '(empty)'}: no such directory; run "
                             f"tools/precompute_trajectories.py --out DIR and set data.trajectories")
        checked["trajectories"] = traj
    if cfg.train.objective != "mdlm" and cfg.distill.teacher:
        from mcd_scale.distill.checkpoints import resolve_teacher_file

        checked["teacher"] = resolve_teacher_file(cfg.distill.teacher)  # an InputError names the fix
    root = checkpoint_root(cfg.run.dir)
    tag = resolve_load_tag(root, cfg.checkpoint.load)
    if tag is not None:
        checked["resume"] = os.path.join(root, tag)
        if verify_checkpoint:
            checked["integrity"] = verify_tag(root, tag)
    return checked
