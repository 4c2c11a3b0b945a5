#!/usr/bin/env python
"""Run the fault suite (tests/faults) and print its measured figures as one JSON object.

    python tools/dev/faults.py                 # the CI variant (what `pytest tests/faults` runs)
    python tools/dev/faults.py --long          # the long variants: 10 forced restarts of a teacher AND a distill run,
                                           # 1,500 + 1,500 fuzzed configs / --set strings, the student's dead rank,
                                           # every bad-data case through the CLI
    python tools/dev/faults.py --long -k soak  # a subset (pytest -k expression)

The figures are those the tests record (tests/faults/common.py ``record``); docs/reliability.md quotes them.
Exit code: pytest's (0 = every fault behaved as documented).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--long", action="store_true", help="the long variants (MCD_FAULTS_LONG=1)")
    p.add_argument("-k", default="", help="pytest -k expression selecting faults")
    p.add_argument("--report", default="", help="also write the JSON here")
    args = p.parse_args(argv)
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))
    if args.long:
        env["MCD_FAULTS_LONG"] = "1"
    with tempfile.TemporaryDirectory(prefix="mcd_faults_report_") as tmp:
        rows_path = os.path.join(tmp, "figures.jsonl")
        env["MCD_FAULTS_REPORT"] = rows_path
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", os.path.join(REPO, "tests", "faults")]
        if args.k:
            cmd += ["-k", args.k]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        figures = []
        if os.path.exists(rows_path):
            with open(rows_path, encoding="utf-8") as fh:
                figures = [json.loads(x) for x in fh if x.strip()]
    tail = [x for x in proc.stdout.splitlines() if x.strip()][-1:] or [""]
    out = {"variant": "long" if args.long else "ci", "exit_code": proc.returncode, "wall_s": round(time.time() - t0, 1),
           "pytest": tail[0], "figures": figures}
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-20000:])
    text = json.dumps(out, indent=2)
    print(text)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
