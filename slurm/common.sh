# shellcheck shell=bash
# Shared by slurm/*.sh (sourced): environment, rendezvous, launching a stage, signals, exit-code actions.
#
# Exit codes (mcd_scale.EXIT_*) and what the batch script does with them:
#   0  done                                   -> nothing
#   2  bad config / input                     -> NOT requeued: fix it and resubmit
#   3  diverged (K non-finite steps in a row) -> NOT requeued: see the run's metrics.jsonl
#   4  preempted, checkpoint / shards saved   -> scontrol requeue "$SLURM_JOB_ID" (resumes from the checkpoint)
#   *  anything else (a crash, a killed rank) -> NOT requeued: read the log; a resubmit resumes
#
# Signals: sbatch --signal=B:USR1@N sends USR1 to this batch shell only. The trap below passes it on to the
# job steps (`scancel --signal=USR1 $SLURM_JOB_ID`, no --full: the batch step is not signalled again) and
# to the stage's own process (the driver in the batch step). Every stage turns USR1/TERM into "save at the
# next step / shard boundary, exit 4". srun runs with --kill-on-bad-exit=0 so that the ranks' common exit 4
# comes back from srun as 4 (with =1 the first rank to exit gets its peers killed and srun returns 137);
# a dead rank is bounded instead by the collective timeout (distributed.timeout_s) and srun --wait.
#
# NCCL (documented defaults, each overridable from the environment):
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  a failed/timed-out collective aborts the process instead of hanging
#   NCCL_DEBUG=WARN                    one line per NCCL problem in the per-job log
#   NCCL_IB_TIMEOUT=22                 InfiniBand retry timeout (4.096 us * 2^22 ~ 17 s) for congested fabrics
#   NCCL_SOCKET_IFNAME                 unset: NCCL picks the interface; set it where nodes have several

mcd_setup() {
  cd "${SLURM_SUBMIT_DIR:-$MCD_REPO}" || exit 2
  PY="${PYTHON:-.venv/bin/python}"
  NTASKS="${SLURM_NTASKS:-${NTASKS:-16}}"
  # srun no longer inherits sbatch's --cpus-per-task (SLURM >= 22.05): pass it on explicitly.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
  fi
  # Master = the first host of the allocation, expanded by SLURM itself (a regex breaks on rack[1-2]-gpu[01-04]).
  if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null 2>&1; then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  fi
  export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
  # 15000-29999: below Linux's ephemeral range (32768-60999), so no outgoing connection already holds it;
  # derived from the job id so concurrent jobs on a node differ.
  export MASTER_PORT="${MASTER_PORT:-$((15000 + ${SLURM_JOB_ID:-0} % 15000))}"
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  # Trajectory shard size: the precompute job and the distill driver's round 0 must agree (it resumes the shards).
  SAMPLES_PER_SHARD="${SAMPLES_PER_SHARD:-1024}"
  # Per-job logs: one file per task and job step, one directory per (re)start of the job, so a requeued run
  # does not overwrite the log of the run it resumes (the batch script's own output is sbatch --output).
  LOG_DIR="${LOG_DIR:-logs/${SLURM_JOB_NAME:-mcd}-${SLURM_JOB_ID:-local}}/restart${SLURM_RESTART_COUNT:-0}"
  if [ -z "${DRY_RUN:-}" ]; then mkdir -p "$LOG_DIR" || exit 2; fi
  # One launcher line for every stage: one task per GPU, exit codes of the ranks preserved (see above).
  # (%s = job step, %t = task: srun's own file name patterns; LOG_DIR must not contain spaces.)
  LAUNCHER="srun --kill-on-bad-exit=0 --wait=${STEP_EXIT_WAIT_S:-300} --output=${LOG_DIR}/step%s.rank%t.log $PY"
  echo "[slurm] job ${SLURM_JOB_ID:-local} restart ${SLURM_RESTART_COUNT:-0}: ${NTASKS} tasks, master" \
       "${MASTER_ADDR}:${MASTER_PORT}, logs ${LOG_DIR}"
}

# The plan for DRY_RUN=1 (on a login node, before sbatch): what the job would do and whether it would start.
# mcd_plan CONFIG [PATH...] [-- TRAIN_ARGS...] prints the allocation and launcher, "# path ok/MISSING" for each
# PATH the stage needs (a teacher, data), then train.py --dry-run: the inputs named in the config (data,
# teacher, trajectories, a checkpoint to resume, verified), the layout, the DeepSpeed config and the per-rank
# memory plan. The plan is printed even when inputs are missing (the layout is still worth checking before the
# data is staged); the exit code is the job's: 0 when it would start, 2 when an input is missing or the
# layout is refused. TRAIN_ARGS (e.g. --set data.path=...) go to train.py as in the job.
mcd_plan() {
  local config="$1" missing=0 rc errfile
  shift
  echo "# plan: ${NTASKS} tasks, master ${MASTER_ADDR}:${MASTER_PORT}, logs ${LOG_DIR}"
  echo "# launcher: ${LAUNCHER}"
  echo "# on exit: 0 done; 4 preempted -> requeued; 2 bad input, 3 diverged, other -> not requeued"
  if [ -e "$config" ]; then echo "# path ok: $config"; else echo "# path MISSING: $config"; missing=1; fi
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    if [ -e "$1" ]; then echo "# path ok: $1"; else echo "# path MISSING: $1"; echo "MISSING: $1" >&2; missing=1; fi
    shift
  done
  [ $# -gt 0 ] && shift
  errfile="$(mktemp)"
  "$PY" mcd_scale/train.py --config "$config" --dry-run --world-size "$NTASKS" "$@" 2>"$errfile"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    # Missing inputs or a refused layout? The layout alone decides: a refused one is the error (printed once).
    if "$PY" mcd_scale/train.py --config "$config" --dry-run --layout-only --world-size "$NTASKS" "$@"; then
      cat "$errfile" >&2
      missing=1
    else
      rc=$?
      rm -f "$errfile"
      return "$rc"
    fi
  fi
  rm -f "$errfile"
  if [ "$missing" -ne 0 ]; then
    echo "# dry run: the layout is valid but inputs are missing (stderr); the job would exit 2" >&2
    return 2
  fi
  echo "# dry run: ok, the job would start"
}

_mcd_forward_signal() {
  MCD_PREEMPTED=1
  echo "[slurm] $1 received: asking the stage to save at its next boundary and exit 4"
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || true
  fi
  if [ -n "${MCD_STAGE_PID:-}" ]; then
    kill -USR1 "$MCD_STAGE_PID" 2>/dev/null || true
  fi
}

# mcd_run CMD...: run one stage in the background, forward USR1/TERM to it, return its exit code.
mcd_run() {
  "$@" &
  MCD_STAGE_PID=$!
  trap '_mcd_forward_signal USR1' USR1
  trap '_mcd_forward_signal TERM' TERM
  local rc
  local again
  while true; do
    wait "$MCD_STAGE_PID"
    rc=$?
    # `wait` returns >128 early when a trapped signal arrives while the stage is still saving: wait again.
    if [ "$rc" -gt 128 ] && kill -0 "$MCD_STAGE_PID" 2>/dev/null; then continue; fi
    if [ "$rc" -gt 128 ]; then  # ended as the trap ran: its own status, unless it was already collected
      wait "$MCD_STAGE_PID" 2>/dev/null
      again=$?
      if [ "$again" -ne 127 ]; then rc=$again; fi
    fi
    break
  done
  MCD_STAGE_PID=""
  return "$rc"
}

# mcd_finish RC WHAT: act on a stage's exit code (table above) and exit with it.
mcd_finish() {
  local rc="$1" what="$2"
  if [ "${MCD_PREEMPTED:-0}" = 1 ] && [ "$rc" -gt 128 ]; then
    # Killed by the preemption signal itself (a task still starting, before its handler was installed):
    # checkpoints and shards are only ever published complete, so the requeued job resumes as from 4.
    echo "[slurm] $what ended by signal ($rc) after a preemption signal: treated as preempted (4)"
    rc=4
  fi
  case "$rc" in
    0) echo "[slurm] $what finished" ;;
    4) echo "[slurm] $what preempted (checkpoint saved): requeueing job ${SLURM_JOB_ID:-}"
       if [ -n "${SLURM_JOB_ID:-}" ]; then scontrol requeue "$SLURM_JOB_ID"; fi ;;
    2) echo "[slurm] $what: configuration or input error; fix it and resubmit (not requeued)" ;;
    3) echo "[slurm] $what diverged; see its metrics.jsonl (not requeued)" ;;
    *) echo "[slurm] $what failed with exit code $rc (not requeued; a resubmit resumes)" ;;
  esac
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 4 ]; then
    echo "[slurm] the ranks' logs: ${LOG_DIR}/step*.rank*.log; the last lines of rank 0's:"
    tail -n 5 "${LOG_DIR}"/step*.rank0.log 2>/dev/null
  fi
  exit "$rc"
}
