#!/usr/bin/env python
"""Run the long tier: the tests marked ``@pytest.mark.long`` (skipped in the suite; docs/testing.md lists each and
the shorter test that covers it in CI).

    python tools/dev/long_tests.py              # every long test
    python tools/dev/long_tests.py -k demo      # a subset (pytest -k expression)

The fault suite's long variants (more restarts, more fuzzed inputs) have their own runner, tools/dev/faults.py --long.
Exit code: pytest's.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-k", default="", help="pytest -k expression selecting long tests")
    args = p.parse_args(argv)
    env = dict(os.environ, MCD_LONG_TESTS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "--durations=0", "-m", "long",
           os.path.join(REPO, "tests")]
    if args.k:
        cmd += ["-k", args.k]
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
