#!/usr/bin/env bash
# The 1B MCD pipeline on SLURM: rounds of (precompute trajectories -> distill student), resumable.
#
#   sbatch slurm/distill_1b.sh                      # uses runs/teacher_1b as the round-0 teacher
#   TEACHER=runs/my_teacher RUN_DIR=runs/d1 sbatch slurm/distill_1b.sh [--set key=value ...]
#   DRY_RUN=1 NTASKS=16 bash slurm/distill_1b.sh    # paths, layout and memory plan; starts nothing
#
# The driver (tools/distill_rounds.py, in the batch step) starts each child with srun. Preemption: the
# batch shell's USR1 goes to the job steps (the running child saves at its next boundary, exits 4) and to
# the driver (starts no further child, exits 4); this script requeues on 4 only. Re-running is always safe:
# the driver skips finished rounds, precompute skips complete shards, the trainer resumes from
# checkpoints/latest. Lead time: 300 s, sized for a 1B save (see slurm/pretrain_teacher_1b.sh).
# Exit codes and actions: slurm/common.sh.
#SBATCH --job-name=mcd-distill-1b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
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

if [ -n "${DRY_RUN:-}" ]; then
  # Checked as an online round: an offline round's trajectories do not exist before the driver writes them,
  # and the online layout also holds the frozen teacher (an upper bound on memory). Pass --set as to the driver.
  echo "# layout and memory checked with distill.teacher_mode=online (upper bound of an offline round)"
  mcd_plan "$CONFIG" "$TEACHER" -- --set distill.teacher_mode=online --set "distill.teacher=$TEACHER" "$@"
  exit $?
fi

mcd_run "$PY" tools/distill_rounds.py --teacher "$TEACHER" --config "$CONFIG" --run-dir "$RUN_DIR" \
  --samples-per-shard "$SAMPLES_PER_SHARD" --launcher "$LAUNCHER" "$@"
mcd_finish $? "distillation ($RUN_DIR/rounds.json)"
