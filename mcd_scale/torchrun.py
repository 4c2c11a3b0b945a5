"""``python -m mcd_scale.torchrun [torchrun options] -m mcd_scale.train --config ...``: torchrun that keeps
the ranks' exit code.

torchrun turns any failed rank into its own exit code 1 (plus the agent's traceback), so a script cannot
tell bad input (2), divergence (3) or preemption (4) from a crash. This is torchrun itself
(``torch.distributed.run``, same options) exiting with the code of the first rank that failed, after one
line naming it. Signal deaths (negative codes) and agent errors stay 1.
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    # lazy: loads torch; importing this module does not need it
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()  # the root cause: the peers are stopped after it
        code = failure.exitcode if failure.exitcode > 0 else 1
        print(f"[torchrun] rank {rank} exited with code {failure.exitcode} first; exiting {code}", file=sys.stderr,
              flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
