"""mcd_scale: masked diffusion LMs and Masked Consistency Distillation on DeepSpeed + megatron-core."""
__version__ = "0.1.0"

# Exit codes are API (SLURM scripts and drivers branch on them).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2      # bad config / input: fix and resubmit, do not requeue
EXIT_DIVERGED = 3    # too many non-finite losses in a row
EXIT_PREEMPTED = 4   # SIGTERM/SIGUSR1 received: checkpoint written, requeue
