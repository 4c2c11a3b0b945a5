#!/usr/bin/env bash
# Precompute round-0 teacher trajectories for offline MCD on SLURM, resumable (finished shards are kept).
#
#   sbatch slurm/precompute_trajectories_1b.sh [--limit N ...]
#   TEACHER=runs/teacher_1b RUN_DIR=runs/distill_1b sbatch slurm/precompute_trajectories_1b.sh
#   DRY_RUN=1 NTASKS=16 bash slurm/precompute_trajectories_1b.sh
#
# Writes RUN_DIR/round_0/trajectories, the directory slurm/distill_1b.sh's round 0 reads (it then skips the
# complete shards). Preemption: USR1 -> every rank finishes its current shard, exit 4, requeue. The lead
# time only has to cover one shard (1024 samples of teacher forwards, seconds to a minute): 300 s as the
# training scripts. Exit codes and actions: slurm/common.sh.
#SBATCH --job-name=mcd-precompute-1b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail
MCD_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=slurm/common.sh
source "${SLURM_SUBMIT_DIR:-$MCD_REPO}/slurm/common.sh"
mcd_setup

CONFIG="${CONFIG:-configs/distill_1b.yaml}"
TEACHER="${TEACHER:-runs/teacher_1b}"
RUN_DIR="${RUN_DIR:-runs/distill_1b}"
DATA="${DATA:-}"
if [ -z "$DATA" ]; then
  DATA="$("$PY" -c 'import sys
from mcd_scale.config import ConfigError, load_config
try:
    print(load_config([sys.argv[1]]).data.path)
except (ConfigError, OSError) as exc:
    sys.exit(f"error: {sys.argv[1]}: {exc}")' "$CONFIG")" || exit 2
fi

if [ -n "${DRY_RUN:-}" ]; then
  # train.py --dry-run as an online round checks the data and the teacher (the trajectories are this job's output).
  mcd_plan "$CONFIG" "$TEACHER" "$DATA" -- --set "data.path=$DATA" --set distill.teacher_mode=online \
    --set "distill.teacher=$TEACHER"
  exit $?
fi

# shellcheck disable=SC2086  # LAUNCHER is a command line by design
mcd_run $LAUNCHER tools/precompute_trajectories.py --teacher "$TEACHER" --data "$DATA" --config "$CONFIG" \
  --out "$RUN_DIR/round_0/trajectories" --round 0 --samples-per-shard "$SAMPLES_PER_SHARD" --no-progress --set distill.round=0 "$@"
mcd_finish $? "trajectory precompute ($RUN_DIR/round_0/trajectories)"
