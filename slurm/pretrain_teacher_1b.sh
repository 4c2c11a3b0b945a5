#!/usr/bin/env bash
# Pretrain the 1B MDLM teacher on SLURM, resumable across preemptions.
#
#   sbatch slurm/pretrain_teacher_1b.sh [--set key=value ...]
#   CONFIG=configs/teacher_1b.yaml RUN_DIR=runs/teacher_1b sbatch slurm/pretrain_teacher_1b.sh
#   DRY_RUN=1 NTASKS=16 bash slurm/pretrain_teacher_1b.sh   # paths, layout and memory plan; starts nothing
#
# Preemption: --signal=B:USR1@300 gives 5 minutes between the signal and the kill. A 1B save writes ~1.3e9
# params x (2 B bf16 weights + 12 B fp32 master/Adam moments) ~ 18 GB across the ranks plus a 2.6 GB
# consolidated file from rank 0; at a pessimistic 200 MB/s per-node share of a loaded parallel filesystem
# that is ~100 s, plus up to one training step (the signal is acted on at a step boundary) and the
# process start/stop: 300 s leaves a 2x margin. The trainer saves, exits 4, and this script requeues.
# Exit codes and actions: slurm/common.sh.
#SBATCH --job-name=mcd-teacher-1b
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

CONFIG="${CONFIG:-configs/teacher_1b.yaml}"
RUN_DIR="${RUN_DIR:-runs/teacher_1b}"

if [ -n "${DRY_RUN:-}" ]; then
  mcd_plan "$CONFIG" -- "$@"
  exit $?
fi

# shellcheck disable=SC2086  # LAUNCHER is a command line by design
mcd_run $LAUNCHER mcd_scale/train.py --config "$CONFIG" --set "run.dir=$RUN_DIR" "$@"
mcd_finish $? "teacher pretraining ($RUN_DIR)"
