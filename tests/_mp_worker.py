"""One rank of tests.mp.run_ranks: import module:function, call it, save the result."""
import importlib
import os
import sys
import traceback

import torch


def main() -> int:
    target, tmp = sys.argv[1], sys.argv[2]
    module, _, name = target.partition(":")
    kwargs = torch.load(os.path.join(tmp, "kwargs.pt"), weights_only=False)
    rank = int(os.environ["RANK"])
    finished = False
    try:
        fn = getattr(importlib.import_module(module), name)
        result = fn(**kwargs)
        torch.save(result, os.path.join(tmp, f"result{rank}.pt"))
        finished = True
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        return 1
    finally:
        try:
            from mcd_scale.parallel.distributed import shutdown

            # on success, drain queued gloo work before exit (see mcd_scale.parallel.distributed.shutdown)
            shutdown(drain=finished)
        except Exception:
            traceback.print_exc()
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
