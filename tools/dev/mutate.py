#!/usr/bin/env python
"""Mutation check of the test suite: apply realistic one-line bugs one at a time, report caught/survived.

    .venv/bin/python tools/dev/mutate.py                      # every mutation in MUTATIONS, JSON on stdout
    .venv/bin/python tools/dev/mutate.py --only sdpa-scale-1 --only teacher-fed-z_t
    .venv/bin/python tools/dev/mutate.py --list               # names, files and test files
    .venv/bin/python tools/dev/mutate.py --mutations my.json  # another list (same fields as MUTATIONS)
    .venv/bin/python tools/dev/mutate.py --source worktree    # the working tree as it is, not HEAD

Each mutation is (name, file, old, new, tests): ``old`` must occur exactly once in ``file`` (else the
mutation is reported ``stale``: the code moved, update the list). The repository is copied ONCE to a
temporary directory (``git archive HEAD`` by default, so a score belongs to a commit; ``--source
worktree`` copies tracked and untracked-but-not-ignored files), each mutation is applied there, the
mutation's test files run with pytest (``-x``, in the copy, PYTHONPATH = the copy), and the file is
restored before the next one. The checkout this tool is run from is never written to.

Verdicts: ``caught`` (pytest failed: exit 1, or 2 when collection broke), ``survived`` (exit 0),
``timeout`` (counted as caught, reported apart), ``stale`` / ``error`` (not counted). Before the
mutations, the union of their test files runs once unmutated (``--no-baseline`` skips it): a test
file that fails there would "catch" every mutation, so its mutations are reported ``baseline-failed``.

Output: one JSON object {"source", "caught", "survived", "counted", "score", "results": [...]}
(also written to --out when given). Exit 0 when it ran (whatever the score), 2 on bad input.
Slow by nature (one pytest per mutation): the list names only each mutation's relevant test files.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The five survivors of the first mutation run first, then realistic bugs across the core modules. Each entry's tests
# are the files that should catch it (kept short: the run is one pytest per mutation).
MUTATIONS: list[dict] = [
    {"name": "sdpa-scale-1", "file": "mcd_scale/model/layers.py",
     "why": "attention logits not divided by sqrt(head_dim)",
     "old": "dropout_p=p, is_causal=False)",
     "new": "dropout_p=p, is_causal=False, scale=1.0)",
     "tests": ["tests/test_model_reference.py"]},
    {"name": "rotary-queries-only", "file": "mcd_scale/model/layers.py",
     "why": "rotary applied to the queries but not the keys",
     "old": "q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)",
     "new": "q, k = apply_rotary(q, cos, sin), k",
     "tests": ["tests/test_model_reference.py"]},
    {"name": "latest-before-rename", "file": "mcd_scale/checkpoint/store.py",
     "why": "'latest' names the new tag before its directory is renamed into place",
     "old": "        os.replace(staged, final)\n        _atomic_write(os.path.join(root, \"latest\"), tag)\n",
     "new": "        _atomic_write(os.path.join(root, \"latest\"), tag)\n        os.replace(staged, final)\n",
     "tests": ["tests/test_checkpoint_write_order.py"]},
    {"name": "teacher-fed-z_t", "file": "mcd_scale/training/precompute.py",
     "why": "precompute runs the teacher on z_t (positions still those masked at s)",
     "old": "    logits = model(z_dev, s.to(device=dev, dtype=torch.float32))",
     "new": "    logits = model(coupled_pair(x, t, s, u, schedule, params[\"mask_id\"])[0].to(dev), "
            "s.to(device=dev, dtype=torch.float32))",
     "tests": ["tests/test_precompute_targets.py"]},
    {"name": "sampler-redraws-revealed", "file": "mcd_scale/diffusion/sampling.py",
     "why": "every step re-draws the already revealed tokens of the rows it evaluates (no extra calls)",
     "old": "_fill(sub, reveal[rows], logits, [ids[int(r)] for r in rows], seed, vocab_size, temperature,",
     "new": "_fill(sub, reveal[rows] | (sub != mask_id), logits, [ids[int(r)] for r in rows], seed, vocab_size, "
            "temperature,",
     "tests": ["tests/test_sampler_carry_over.py"]},
    # --- others
    {"name": "final-fill-redraws-revealed", "file": "mcd_scale/diffusion/sampling.py",
     "why": "the final fill after the last step re-draws every token of the rows it touches",
     "old": "_fill(sub, remaining[rows], logits,",
     "new": "_fill(sub, remaining[rows] | True, logits,",
     "tests": ["tests/test_sampler_carry_over.py"]},
    {"name": "teacher-fed-time-t", "file": "mcd_scale/training/precompute.py",
     "why": "precompute conditions the teacher on t instead of s",
     "old": "    logits = model(z_dev, s.to(device=dev, dtype=torch.float32))",
     "new": "    logits = model(z_dev, t.to(device=dev, dtype=torch.float32))",
     "tests": ["tests/test_precompute_targets.py"]},
    {"name": "mask-inverted", "file": "mcd_scale/diffusion/masking.py",
     "why": "tokens kept with probability 1 - alpha_t",
     "old": "return torch.where(u < alpha.unsqueeze(1), x, torch.full_like(x, mask_id))",
     "new": "return torch.where(u > alpha.unsqueeze(1), x, torch.full_like(x, mask_id))",
     "tests": ["tests/test_diffusion_masking.py"]},
    {"name": "nelbo-weight-denominator", "file": "mcd_scale/diffusion/schedules.py",
     "why": "NELBO weight -alpha'/alpha instead of -alpha'/(1 - alpha)",
     "old": "return -self.dalpha(t) / (1.0 - self.alpha(t))",
     "new": "return -self.dalpha(t) / self.alpha(t)",
     "tests": ["tests/test_diffusion_nelbo.py"]},
    {"name": "nelbo-weights-on-revealed", "file": "mcd_scale/diffusion/nelbo.py",
     "why": "revealed tokens get the NELBO weight too (SUBS carry-over broken)",
     "old": "return torch.where(z_t == mask_id, w.unsqueeze(1), torch.zeros((), dtype=torch.float32))",
     "new": "return w.unsqueeze(1).expand(z_t.shape).clone()",
     "tests": ["tests/test_diffusion_nelbo.py"]},
    {"name": "coupled-pair-alpha-s-at-t", "file": "mcd_scale/diffusion/duality.py",
     "why": "z_s built with alpha_t (the pair is no longer s < t)",
     "old": "a_s = schedule.alpha(s.to(torch.float64)).unsqueeze(1).to(u.device)",
     "new": "a_s = schedule.alpha(t.to(torch.float64)).unsqueeze(1).to(u.device)",
     "tests": ["tests/test_diffusion_duality.py"]},
    {"name": "thresholds-ignore-round", "file": "mcd_scale/diffusion/duality.py",
     "why": "every distillation round reuses round 0's thresholds",
     "old": "ids = (seed, int(sid)) if round_idx is None else (seed, int(sid), int(round_idx))",
     "new": "ids = (seed, int(sid))",
     "tests": ["tests/test_diffusion_duality.py"]},
    {"name": "loss-tail-bucket-weight", "file": "mcd_scale/distill/loss.py",
     "why": "reverse-KL tail bucket weighted by the teacher's tail mass instead of the student's",
     "old": "kl = kl + log_rest.exp() * (log_rest - tail)",
     "new": "kl = kl + tail.exp() * (log_rest - tail)",
     "tests": ["tests/test_distill_loss.py"]},
    {"name": "loss-kl-on-masked-at-t", "file": "mcd_scale/distill/loss.py",
     "why": "the divergence also applied where the token is revealed at s",
     "old": "kl_mask = masked_s  # contained in masked_t for a coupled pair",
     "new": "kl_mask = masked_t",
     "tests": ["tests/test_distill_loss.py"]},
    {"name": "targets-temperature-after-softmax", "file": "mcd_scale/distill/targets.py",
     "why": "log-probs divided by tau after the log-softmax (no longer normalised)",
     "old": "return torch.log_softmax(real / temperature, dim=-1)",
     "new": "return torch.log_softmax(real, dim=-1) / temperature",
     "tests": ["tests/test_distill_targets.py"]},
    {"name": "coupled-times-clamp", "file": "mcd_scale/distill/rounds.py",
     "why": "s = t - dt clamped (a point mass at t_min) instead of the affine map",
     "old": "s = t_min + (t64.clamp(t_min, 1.0) - t_min) * ((1.0 - t_min - dt) / (1.0 - t_min))",
     "new": "s = (t64 - dt).clamp(min=t_min)",
     "tests": ["tests/test_distill_rounds.py"]},
    {"name": "ancestral-reveal-probability", "file": "mcd_scale/diffusion/sampling.py",
     "why": "ancestral reveal probability divided by 1 - alpha_s instead of 1 - alpha_t",
     "old": "reveal = masked & (draws < (a_s - a_t) / (1.0 - a_t))",
     "new": "reveal = masked & (draws < (a_s - a_t) / (1.0 - a_s))",
     "tests": ["tests/test_diffusion_sampling.py"]},
    {"name": "inverse-cdf-unscaled-uniform", "file": "mcd_scale/diffusion/sampling.py",
     "why": "the uniform is scaled by the first CDF entry instead of the total: draws pile on the first tokens",
     "old": "x = (u.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)",
     "new": "x = (u.to(cdf.device, cdf.dtype) * cdf[:, 0]).unsqueeze(-1)",
     "tests": ["tests/test_diffusion_sampling.py"]},
    {"name": "sampler-tail-not-greedy", "file": "mcd_scale/diffusion/sampling.py",
     "why": "greedy_tail ignored: the last masks are sampled",
     "old": "mode + \"-token\", greedy=greedy_tail)",
     "new": "mode + \"-token\", greedy=False)",
     "tests": ["tests/test_diffusion_sampling.py"]},
    {"name": "ema-decay-swapped", "file": "mcd_scale/distill/ema.py",
     "why": "EMA moves by decay instead of 1 - decay",
     "old": "s.lerp_(local_tensor(p).float(), 1.0 - self.decay)",
     "new": "s.lerp_(local_tensor(p).float(), self.decay)",
     "tests": ["tests/test_distill_ema.py"]},
    {"name": "engine-skip-guard-off-by-one", "file": "mcd_scale/training/engine.py",
     "why": "a step with one non-finite micro-batch is applied instead of skipped",
     "old": "skipped = bad_total > 0",
     "new": "skipped = bad_total > 1",
     "tests": ["tests/test_step_syncs.py"]},
    {"name": "integrity-size-only", "file": "mcd_scale/checkpoint/integrity.py",
     "why": "checkpoint verification checks sizes but not the sha256",
     "old": "        if sha256_file(full) != entry[\"sha256\"]:",
     "new": "        if False:",
     "tests": ["tests/test_checkpoint_integrity.py", "tests/test_integrity_same_size.py"]},
    {"name": "data-sampler-epoch-straddle", "file": "mcd_scale/data/sampler.py",
     "why": "a global batch that straddles an epoch boundary reads past the epoch's end",
     "old": "take = min(end - pos, self.num_samples - offset)",
     "new": "take = min(end - pos, self.num_samples)",
     "tests": ["tests/test_data_sampler.py"]},
    {"name": "rng-key-ids-concatenated", "file": "mcd_scale/rng.py",
     "why": "keyed ids joined without a separator: (1, 23) and (12, 3) share a stream",
     "old": "text = purpose + \":\" + \",\".join(str(int(i)) for i in ids)",
     "new": "text = purpose + \":\" + \"\".join(str(int(i)) for i in ids)",
     "tests": ["tests/test_diffusion_masking.py", "tests/test_data_sampler.py", "tests/test_rng_keys.py"]},
]

FIELDS = ("name", "file", "old", "new", "tests")


class MutateError(Exception):
    """Bad input: one line, exit 2."""


def load_mutations(path: Optional[str]) -> list[dict]:
    if path is None:
        muts = MUTATIONS
    else:
        try:
            with open(path, encoding="utf-8") as fh:
                muts = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise MutateError(f"--mutations {path}: {exc}") from None
    if not isinstance(muts, list):
        raise MutateError(f"--mutations {path}: expected a JSON list of objects with {FIELDS}")
    names = set()
    for i, m in enumerate(muts):
        missing = [f for f in FIELDS if f not in m] if isinstance(m, dict) else list(FIELDS)
        if missing:
            raise MutateError(f"mutation #{i} ({path or 'MUTATIONS'}) lacks {missing}; each needs {FIELDS}")
        if m["name"] in names:
            raise MutateError(f"mutation name {m['name']!r} appears twice ({path or 'MUTATIONS'})")
        if m["old"] == m["new"] or not m["tests"]:
            raise MutateError(f"mutation {m['name']!r}: 'new' must differ from 'old' and 'tests' must be non-empty")
        names.add(m["name"])
    return muts


def _git(repo: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", repo, *args], check=True, **kw)


def make_copy(repo: str, source: str) -> tuple[str, str]:
    """(scratch directory holding a copy of the repository, description of what was copied)."""
    scratch = tempfile.mkdtemp(prefix="mcd_mutate_")
    if os.path.commonpath([os.path.realpath(scratch), os.path.realpath(repo)]) == os.path.realpath(repo):
        raise MutateError(f"scratch directory {scratch} is inside the repository {repo}; set TMPDIR elsewhere")
    if source == "head":
        sha = _git(repo, "rev-parse", "HEAD", capture_output=True, text=True).stdout.strip()
        archive = subprocess.Popen(["git", "-C", repo, "archive", "--format=tar", "HEAD"], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", scratch], stdin=archive.stdout, check=True)
        archive.stdout.close()
        if archive.wait() != 0:
            raise MutateError(f"git archive HEAD failed in {repo}")
        return scratch, f"HEAD {sha}"
    files = _git(repo, "ls-files", "-z", "-c", "-o", "--exclude-standard", capture_output=True).stdout
    for rel in filter(None, files.decode("utf-8").split("\0")):
        src = os.path.join(repo, rel)
        if not os.path.isfile(src):  # deleted in the working tree but still tracked
            continue
        dst = os.path.join(scratch, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)
    return scratch, "worktree"


def default_python(repo: str) -> str:
    venv = os.path.join(repo, ".venv", "bin", "python")
    return venv if os.path.isfile(venv) else sys.executable


def run_pytest(python: str, copy: str, tests: Sequence[str], timeout: float, repo: str) -> tuple[Optional[int], str, float]:
    """(pytest exit code or None on timeout, last lines of its output, seconds) for ``tests`` in ``copy``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = copy + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # Compiled extensions are shared with the checkout (the copy has none; rebuilding costs minutes).
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(repo, ".torch_extensions"))
    env["COLUMNS"] = "300"  # the summary line keeps the assertion message (pytest cuts it to the width)
    cmd = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    t0 = time.perf_counter()
    # Own process group: a timeout (or this tool being stopped) ends pytest and every rank it started.
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        return None, (out or "")[-2000:], time.perf_counter() - t0
    except BaseException:
        _kill_group(proc)
        raise
    return proc.returncode, (out or "")[-2000:], time.perf_counter() - t0


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:300]
    return ""


def run(args) -> dict:
    muts = load_mutations(args.mutations)
    if args.only:
        unknown = sorted(set(args.only) - {m["name"] for m in muts})
        if unknown:
            raise MutateError(f"--only {unknown}: no such mutation (see --list)")
        muts = [m for m in muts if m["name"] in args.only]
    copy, source = make_copy(args.repo, args.source)
    results = []
    try:
        for m in muts:
            for t in m["tests"]:
                if not os.path.isfile(os.path.join(copy, t)):
                    raise MutateError(f"mutation {m['name']!r}: test file {t} is not in the copy ({source}); commit "
                                      f"it or use --source worktree")
        bad_tests: set[str] = set()
        baseline = None
        if args.baseline:
            tests = sorted({t for m in muts for t in m["tests"]})
            for t in tests:  # one file at a time: a failing file must not hide the others' status
                rc, out, sec = run_pytest(args.python, copy, [t], args.timeout, args.repo)
                if rc != 0:
                    bad_tests.add(t)
                    print(f"mutate: baseline {t} failed (rc {rc}): {_first_failure(out)}", file=sys.stderr,
                          flush=True)
            baseline = {"tests": tests, "failed": sorted(bad_tests)}
        for m in muts:
            path = os.path.join(copy, m["file"])
            rec = {"name": m["name"], "file": m["file"], "why": m.get("why", ""), "tests": m["tests"]}
            text = open(path, encoding="utf-8").read() if os.path.isfile(path) else None
            count = text.count(m["old"]) if text is not None else 0
            if count != 1:
                rec.update(status="stale", detail=f"'old' occurs {count} times in {m['file']} (must be once)")
            elif bad_tests & set(m["tests"]):
                rec.update(status="baseline-failed", detail=f"unmutated failure in {sorted(bad_tests & set(m['tests']))}")
            else:
                with open(path, "w", encoding="utf-8") as fh:
                    fh.write(text.replace(m["old"], m["new"]))
                try:
                    rc, out, sec = run_pytest(args.python, copy, m["tests"], args.timeout, args.repo)
                finally:
                    with open(path, "w", encoding="utf-8") as fh:
                        fh.write(text)
                status = {0: "survived", 1: "caught", 2: "caught"}.get(rc, "timeout" if rc is None else "error")
                rec.update(status=status, rc=rc, seconds=round(sec, 1), detail=_first_failure(out))
                if status == "error":
                    rec["output_tail"] = out[-600:]
            results.append(rec)
            print(f"mutate: {m['name']}: {rec['status']} {rec.get('detail', '')}", file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"mutate: scratch copy kept at {copy}", file=sys.stderr)
        else:
            shutil.rmtree(copy, ignore_errors=True)
    caught = sum(r["status"] in ("caught", "timeout") for r in results)
    survived = sum(r["status"] == "survived" for r in results)
    report = {"source": source, "caught": caught, "survived": survived, "counted": caught + survived,
              "score": f"{caught}/{caught + survived}",
              "survivors": [r["name"] for r in results if r["status"] == "survived"],
              "not_counted": [r["name"] for r in results if r["status"] not in ("caught", "timeout", "survived")],
              "baseline": baseline, "results": results}
    return report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this mutation (repeatable)")
    ap.add_argument("--mutations", default=None, help="JSON list of mutations instead of the built-in MUTATIONS")
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--source", choices=("head", "worktree"), default="head",
                    help="what to copy: HEAD (git archive) or the working tree (tracked + untracked, not ignored)")
    ap.add_argument("--python", default=None, help="interpreter for pytest (default: REPO/.venv/bin/python)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (a timeout counts as caught)")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip the unmutated run of the test files")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy (its path goes to stderr)")
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    ap.add_argument("--repo", default=REPO, help=argparse.SUPPRESS)
    return ap


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run(): the pytest group is killed, the copy removed


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    args.python = args.python or default_python(args.repo)
    try:
        if args.list:
            for m in load_mutations(args.mutations):
                print(f"{m['name']:32s} {m['file']:36s} {' '.join(m['tests'])}")
            return 0
        report = run(args)
    except MutateError as exc:
        print(f"mutate: error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"mutate: error: {' '.join(exc.cmd)} failed (exit {exc.returncode}); is {args.repo} a git checkout?",
              file=sys.stderr)
        return 2
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
