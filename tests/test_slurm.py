"""The SLURM entry script: valid bash, and its dry run validates the shipped 1B config for the allocation."""
import json
import subprocess

from tests.mp import REPO, base_env


def test_distill_1b_script_syntax_and_dry_run():
    assert subprocess.run(["bash", "-n", "slurm/distill_1b.sh"], cwd=REPO).returncode == 0
    env = base_env({"DRY_RUN": "1", "SLURM_NTASKS": "16", "PYTHON": __import__("sys").executable})
    res = subprocess.run(["bash", "slurm/distill_1b.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["world_size"] == 16 and plan["tp"] * plan["pp"] * plan["dp"] == 16
    bad = subprocess.run(["bash", "slurm/distill_1b.sh"], cwd=REPO, env={**env, "SLURM_NTASKS": "3"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not divisible" in bad.stderr
