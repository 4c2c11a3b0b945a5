"""tools/dev/mutate.py: one mutation is applied on a scratch copy, caught by its tests, and the checkout is
left exactly as it was; the built-in list still applies to the code (each 'old' text occurs once)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from tests.mp import REPO

TOOL = os.path.join(REPO, "tools", "dev", "mutate.py")


def _digest(rel: str) -> str:
    with open(os.path.join(REPO, rel), "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _run(tmp_path, *args):
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the scratch copy lands here: checked empty afterwards
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env, timeout=600)


def test_one_mutation_is_caught_and_the_checkout_is_untouched(tmp_path):
    from tools.mutate import MUTATIONS

    mut = next(m for m in MUTATIONS if m["name"] == "mask-inverted")
    before = _digest(mut["file"])
    proc = _run(tmp_path, "--only", "mask-inverted", "--source", "worktree", "--no-baseline")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["score"] == "1/1" and report["survivors"] == [], report
    (res,) = report["results"]
    assert res["status"] == "caught" and res["rc"] == 1 and "test_diffusion_masking" in res["detail"], res
    assert _digest(mut["file"]) == before, f"{mut['file']} in the checkout was modified"
    assert os.listdir(tmp_path) == [], f"scratch copy left behind: {os.listdir(tmp_path)}"


def test_stale_mutation_is_reported_not_counted_and_bad_input_is_one_line(tmp_path):
    muts = tmp_path / "muts.json"
    muts.write_text(json.dumps([{"name": "gone", "file": "mcd_scale/rng.py", "old": "no such text in the file",
                                 "new": "x", "tests": ["tests/test_diffusion_masking.py"]}]))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = _run(scratch, "--mutations", str(muts), "--source", "worktree", "--no-baseline")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["counted"] == 0 and report["not_counted"] == ["gone"]
    assert report["results"][0]["status"] == "stale"

    muts.write_text(json.dumps([{"name": "half"}]))
    proc = _run(scratch, "--mutations", str(muts))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "lacks" in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(scratch) == []


def test_builtin_mutations_apply_to_the_current_code():
    """Each built-in mutation's text occurs exactly once in its file and its test files exist: a refactor
    that moves the code makes this fail, so the list (and the score in docs/architecture.md) is updated."""
    from tools.mutate import MUTATIONS, load_mutations

    load_mutations(None)  # fields, unique names
    for m in MUTATIONS:
        with open(os.path.join(REPO, m["file"]), encoding="utf-8") as fh:
            count = fh.read().count(m["old"])
        assert count == 1, f"mutation {m['name']}: its 'old' text occurs {count} times in {m['file']}"
        for t in m["tests"]:
            assert os.path.isfile(os.path.join(REPO, t)), f"mutation {m['name']}: no test file {t}"
