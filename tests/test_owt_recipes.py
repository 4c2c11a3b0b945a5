"""configs/owt/: every recipe validates under ``--dry-run --world-size 8`` and ``64`` with the memory and disk
plans printed; every number in them names its source; the disk plan's parts add up."""
from __future__ import annotations

import glob
import json
import os
import re

import pytest

from tests.mp import REPO

RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "owt", "*.yaml")))


def test_there_are_the_three_recipes():
    assert [os.path.basename(f) for f in RECIPES] == ["mcd_duo_schedule.yaml", "mcd_sdtt_schedule.yaml",
                                                      "mdlm_small_teacher.yaml"]


@pytest.mark.parametrize("world", [8, 64])
@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_recipe_validates_with_memory_and_disk_plans(recipe, world, capsys):
    from mcd_scale.config import load_config
    from mcd_scale.distill.disk_plan import checkpoint_tag_bytes, trajectory_round_bytes
    from mcd_scale.train import main

    assert main(["--config", recipe, "--dry-run", "--layout-only", "--world-size", str(world)]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = load_config([recipe], [])
    assert out["ok"] and out["world_size"] == world and out["dp"] * out["grad_accum"] * cfg.parallel.micro_batch \
        == cfg.parallel.global_batch
    assert out["memory_plan"]["total_gib"] > 0
    disk = out["disk_plan"]
    tag = checkpoint_tag_bytes(cfg, out["memory_plan"]["parameters_total"])
    assert disk["checkpoint_tag_bytes"] == tag and "consolidated_ema" in tag  # every recipe keeps an EMA
    assert disk["checkpoints_bytes"] == tag["total"] * (cfg.checkpoint.keep_last + 1)
    if cfg.train.objective == "mcd":
        assert disk["trajectories"]["samples"] == cfg.distill.steps_per_round * cfg.parallel.global_batch
        assert disk["trajectories"]["bytes_per_round"] == trajectory_round_bytes(cfg)
        assert 0.45 < disk["trajectories"]["masked_fraction_at_s"] < 0.55  # E[s] ~ 1/2 under the loglinear schedule
    else:
        assert "trajectories" not in disk and cfg.train.eval_ema and cfg.train.ema_decay == 0.9999
    assert disk["total_bytes"] == disk["checkpoints_bytes"] + disk.get("trajectories", {}).get("bytes_per_round", 0)


def _numbers_without_source(path: str) -> list[str]:
    """Lines of a recipe that set a number with no comment (on the line, or a comment block just above)."""
    bad, lines = [], open(path, encoding="utf-8").read().splitlines()
    for i, line in enumerate(lines):
        code = line.split("#", 1)[0]
        if re.search(r":\s*[-+]?[0-9.][0-9.e+-]*\s*$", code) and "#" not in line \
                and not (i and lines[i - 1].strip().startswith("#")):
            bad.append(line.strip())
    return bad


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_every_number_has_a_comment(recipe):
    allowed = {"log_every", "num_workers", "keep_last", "pp", "round", "peak_tflops", "every"}  # bookkeeping
    bad = [ln for ln in _numbers_without_source(recipe) if ln.split(":")[0] not in allowed]
    assert not bad, bad
