#!/usr/bin/env bash
# The 1B MCD pipeline on SLURM: rounds of (precompute trajectories -> distill student), resumable.
#
#   sbatch slurm/distill_1b.sh                      # uses runs/teacher_1b as the round-0 teacher
#   TEACHER=runs/my_teacher RUN_DIR=runs/d1 sbatch slurm/distill_1b.sh
#   DRY_RUN=1 bash slurm/distill_1b.sh              # validate the config for this allocation and print the plan
#
# Preemption: SLURM sends SIGUSR1 120 s before the time limit (--signal); the trainer checkpoints at the
# next step boundary and exits 4; this script then requeues itself. Re-running is always safe: the
# driver skips finished rounds, the precompute job skips complete shards, the trainer resumes from
# checkpoints/latest. Exit codes: 0 done, 2 bad config (not requeued), 3 diverged (not requeued).
#SBATCH --job-name=mcd-distill-1b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

CONFIG="${CONFIG:-configs/distill_1b.yaml}"
TEACHER="${TEACHER:-runs/teacher_1b}"
RUN_DIR="${RUN_DIR:-runs/distill_1b}"
PY="${PYTHON:-.venv/bin/python}"
NTASKS="${SLURM_NTASKS:-16}"

if [ -n "${DRY_RUN:-}" ]; then
  exec "$PY" mcd_scale/train.py --config "$CONFIG" --dry-run --world-size "$NTASKS"
fi

# srun starts one task per GPU; mcd_scale.distributed reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and
# takes the master from the node list (port derived from the job id), so no extra rendezvous is needed.
LAUNCHER="srun --kill-on-bad-exit=1 $PY"

# Forward SIGUSR1 (batch shell) to the job steps, which turn it into a checkpoint + exit 4.
trap 'echo "SIGUSR1: asking the step to checkpoint"; scancel --signal=USR1 --full "$SLURM_JOB_ID" 2>/dev/null' USR1

"$PY" tools/distill_rounds.py --teacher "$TEACHER" --config "$CONFIG" --run-dir "$RUN_DIR" \
  --launcher "$LAUNCHER" "$@" &
wait $!
rc=$?
# `wait` returns early (>128) when the trap fires; wait for the driver to finish its checkpoint.
while [ $rc -gt 128 ] && kill -0 $! 2>/dev/null; do wait $!; rc=$?; done

case $rc in
  0) echo "distillation finished: $RUN_DIR/rounds.json" ;;
  4) echo "preempted: requeueing ${SLURM_JOB_ID:-}"; [ -n "${SLURM_JOB_ID:-}" ] && scontrol requeue "$SLURM_JOB_ID" ;;
  2) echo "configuration or input error: fix it and resubmit (not requeued)" ;;
  3) echo "diverged: see $RUN_DIR/round_*/metrics.jsonl (not requeued)" ;;
  *) echo "failed with exit code $rc" ;;
esac
exit $rc
