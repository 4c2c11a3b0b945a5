"""mcd_scale: masked diffusion LMs and Masked Consistency Distillation on DeepSpeed + megatron-core."""
__version__ = "0.1.0"

# Exit codes are API (SLURM scripts and drivers branch on them); defined in mcd_scale.errors.
from mcd_scale.errors import EXIT_CONFIG, EXIT_DIVERGED, EXIT_ERROR, EXIT_OK, EXIT_PREEMPTED  # noqa: E402,F401
