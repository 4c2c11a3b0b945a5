"""The one training loop, shared by teacher pretraining (MDLM) and distillation (MCD / SDTT).

    for step in [state.step, train.steps):
        micro-batches of this DP rank  ->  objective.prepare  ->  engine.train_step
        non-finite policy (all-reduced skip; abort after K in a row with EXIT_DIVERGED)
        log (console / TensorBoard / metrics.jsonl), validate, checkpoint
        preemption (SIGTERM / SIGUSR1): checkpoint, exit EXIT_PREEMPTED

Exit paths are API: normal end saves a final checkpoint and closes writers (EXIT_OK); preemption
saves and returns EXIT_PREEMPTED so a SLURM script can requeue; divergence returns EXIT_DIVERGED.
"""
from __future__ import annotations

import os
import time
from typing import Optional

from mcd_scale.data import bad_input, skip_log
from mcd_scale.parallel import collectives
from mcd_scale import EXIT_DIVERGED, EXIT_OK, EXIT_PREEMPTED
from mcd_scale.checkpoint.manager import CheckpointManager
from mcd_scale.checkpoint.store import TrainState
from mcd_scale.config import Config, save_resolved
from mcd_scale.parallel.distributed import ParallelDims, init_distributed, shutdown
from mcd_scale.signals import PreemptionFlag
from mcd_scale.training.validation import validation_nelbo
from mcd_scale.data.loader import MicroBatchLoader, open_prepared, step_batches
from mcd_scale.training.telemetry import MetricsLogger, ThroughputMeter, plot_loss_curves, train_console_line
from mcd_scale.data.sampler import GlobalBatchSampler
from mcd_scale.data.trajectories import open_trajectories
from mcd_scale.distill.checkpoints import load_teacher_weights
from mcd_scale.distill.ema import EMA
from mcd_scale.training.engine import TrainEngine
from mcd_scale.training.faults import Faults, SampleLog
from mcd_scale.training.objectives import MdlmObjective, build_objective


def build_data(cfg: Config, objective_name: str):
    """(train dataset, validation dataset): token shards, or trajectory shards for offline MCD."""
    m = cfg.model
    if objective_name == "mcd" and cfg.distill.teacher_mode == "offline":
        train = open_trajectories(cfg)
    else:
        train = open_prepared(cfg.data.path, "train", vocab_size=m.vocab_size, seq_len=m.seq_len,
                              skip_corrupt=cfg.data.skip_corrupt)
    val = open_prepared(cfg.data.path, "val", vocab_size=m.vocab_size, seq_len=m.seq_len)
    return train, val


def run_training(cfg: Config, dims: Optional[ParallelDims] = None, preempt: Optional[PreemptionFlag] = None) -> int:
    """Entry used by mcd_scale/train.py. Returns an exit code (see mcd_scale.EXIT_*). ``preempt``: the caller's
    preemption flag (:meth:`Trainer.fit`)."""
    own_dist = dims is None
    if dims is None:
        dims = init_distributed(cfg.parallel.tp, cfg.parallel.pp, timeout_s=cfg.distributed.timeout_s)
    finished = False
    try:
        code = Trainer(cfg, dims).fit(preempt)
        finished = True  # every exit of fit() (done, preempted, diverged) is reached by all ranks together
        return code
    finally:
        if own_dist:
            shutdown(drain=finished)


class Trainer:
    def __init__(self, cfg: Config, dims: ParallelDims):
        self.cfg, self.dims = cfg, dims
        self.rank = collectives.rank()
        self.faults = Faults()  # fault injection from MCD_FAULT_* (all off by default)
        self.run_dir = cfg.run.dir
        self.checkpoints = CheckpointManager(cfg, dims, self.rank)  # resolves and verifies the tag to resume
        teacher_state = self._teacher_state()
        self.objective = build_objective(cfg, dims, teacher_state)
        self.eval_objective = MdlmObjective(cfg, dims)  # validation NELBO for every stage
        self.engine = TrainEngine(cfg, dims, self.objective.loss,
                                  init_state=self.checkpoints.initial_weights(teacher_state))
        if hasattr(self.objective, "attach"):
            self.objective.attach(self.engine)
        self.train_set, self.val_set = build_data(cfg, cfg.train.objective)
        self.state = TrainState(round=cfg.distill.round)
        self.ema = None
        if cfg.train.ema_decay > 0:
            # Under ZeRO-3 DeepSpeed caches gathered parameters between forwards; swapping EMA weights into
            # the partitions must drop that cache or evaluation silently uses the trained weights.
            release = self.engine.engine.empty_partition_cache if cfg.parallel.zero_stage == 3 else None
            self.ema = EMA([p for p in self.engine.module.parameters() if p.requires_grad], cfg.train.ema_decay,
                           release_cache=release)
        resumed = self.checkpoints.resume(self.engine, self.ema)  # step, data cursor, round of the resumed run
        if resumed is not None:
            self.state = resumed
        if self.rank == 0:  # only once the inputs were read: a failed launch leaves the run's files as they were
            save_resolved(cfg, os.path.join(self.run_dir, "config.resolved.yaml"))
        self.logger = MetricsLogger(self.run_dir, self.rank == 0, cfg.logging.tensorboard, cfg.train.steps)
        # lazy: loads megatron; importing this module does not need it
        from mcd_scale.model.flops import train_flops_per_token

        self.flops_per_token = train_flops_per_token(cfg.model)

    # ------------------------------------------------------------------ set-up helpers
    def _teacher_state(self) -> Optional[dict]:
        """Distillation: the student starts from the teacher's consolidated weights."""
        if self.cfg.train.objective == "mdlm" or not self.cfg.distill.teacher:
            return None
        return load_teacher_weights(self.cfg.distill.teacher)

    def _save(self) -> None:
        self.checkpoints.save(self.engine, self.state, self.ema,
                              on_staged=lambda: self.faults.in_save(self.state.step))

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict:
        """Validation NELBO on a fixed set (the first eval_batches global batches of the val split) with
        a fixed corruption key, so the figure is comparable across steps, runs and layouts. The loop is
        mcd_scale/eval/nelbo_eval.py's, which tools/nelbo.py runs on a saved checkpoint."""

        cfg = self.cfg
        out = validation_nelbo(self.engine.eval_loss, self.eval_objective, self.val_set, cfg.train.eval_batches,
                               cfg.parallel.global_batch, cfg.parallel.micro_batch, self.dims.dp_rank, self.dims.dp)
        return {"nelbo": out["nelbo"], "ppl_bound": out["ppl_bound"]}

    # ------------------------------------------------------------------ the loop
    def fit(self, preempt: Optional[PreemptionFlag] = None) -> int:
        """The step loop. ``preempt``: the caller's preemption flag, installed for longer than this call (the
        entry point's, for the process's lifetime); without one (benches, gpu_check, tests) a flag is installed
        for the loop only and the previous handlers are put back when it ends."""
        cfg, state = self.cfg, self.state
        faults = self.faults
        sampler = GlobalBatchSampler(len(self.train_set), cfg.parallel.global_batch, cfg.train.seed)
        loader = MicroBatchLoader(self.train_set, sampler, self.dims.dp_rank, self.dims.dp, cfg.parallel.micro_batch,
                                  start_step=state.step, num_workers=cfg.data.num_workers, stand_in=True)
        it = step_batches(loader)
        sample_log = SampleLog.from_env(self.rank)  # MCD_FAULT_SAMPLE_LOG (soak tests): None otherwise
        exit_code = EXIT_OK
        throughput = ThroughputMeter(cfg.parallel.global_batch * cfg.model.seq_len, self.flops_per_token,
                                     self.dims.world_size, cfg.logging.peak_tflops, start_step=state.step)
        val = None
        # SIGTERM/SIGUSR1 set a flag; the step's one collective carries it (TrainEngine.train_step), so the ranks
        # agree at a step boundary (never mid-step). Our own handlers are put back when fit() returns, whatever way.
        own_flag = preempt is None
        if own_flag:
            preempt = PreemptionFlag()
        try:
            while state.step < cfg.train.steps:
                t_wait = time.time()
                micro = next(it)
                throughput.add_data_wait(time.time() - t_wait)
                if sample_log is not None:
                    sample_log.record(state.step + 1, micro)
                if cfg.data.skip_corrupt:  # opt-in skips are named, never silent (mcd_scale/data/skip_log.py)
                    skip_log.report(self.rank, state.step + 1, micro, sampler, self.dims.dp_rank, self.dims.dp,
                                    cfg.parallel.micro_batch, loader.skipped)
                # Lazily: each micro-batch is prepared just before its forward (an online teacher's fp32 target is
                # [B, L, V], ~0.8 GB for the 1B recipe; grad_accum of them at once would not fit the plan).
                prepared = (self.objective.prepare(m, state.step) for m in micro)
                # A sample this rank could not read (a stand-in took its place): every rank stops at this step.
                loss, skipped, stop = self.engine.train_step(prepared, poison=faults.poison(state.step + 1),
                                                             stop_requested=preempt.requested,
                                                             bad_input=bad_input.of_step(micro), n_micro=len(micro))
                state.step += 1
                state.consumed_samples += cfg.parallel.global_batch
                if skipped or not (loss == loss and abs(loss) != float("inf")):
                    state.nonfinite_skipped += 1
                    state.nonfinite_in_a_row += 1
                    self.logger.console(f"step {state.step}: non-finite loss, update skipped "
                                        f"({state.nonfinite_in_a_row} in a row)")
                    if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                        self.logger.console(f"aborting: {state.nonfinite_in_a_row} non-finite losses in a row "
                                            f"(train.max_nonfinite_in_a_row)")
                        exit_code = EXIT_DIVERGED
                        break
                else:
                    state.nonfinite_in_a_row = 0
                    if self.ema is not None:
                        self.ema.update()
                if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
                    rates = throughput.measure(state.step)
                    rec = {"loss": loss, "lr": self.engine.lr(), "grad_norm": self.engine.grad_norm(), **rates,
                           "skipped_total": state.nonfinite_skipped}
                    self.logger.log(state.step, rec)
                    self.logger.console(train_console_line(state.step, cfg.train.steps, rec,
                                                           self.logger.eta_s(state.step)))
                if cfg.train.eval_every and state.step % cfg.train.eval_every == 0:
                    if cfg.train.eval_ema and self.ema is not None:  # MDLM reports the EMA weights' NELBO
                        with self.ema.swap_in():
                            val = self.validate()
                    else:
                        val = self.validate()
                    self.logger.log(state.step, val, prefix="val")
                    self.logger.console(f"step {state.step} validation NELBO {val['nelbo']:.4f} "
                                        f"(ppl <= {val['ppl_bound']:.1f})")
                if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 and state.step < cfg.train.steps:
                    self._save()
                faults.after_step(state.step, self.rank)
                if stop:
                    self.logger.console(f"preemption signal: saving at step {state.step} and exiting "
                                        f"with code {EXIT_PREEMPTED} (requeue)")
                    exit_code = EXIT_PREEMPTED
                    break
            if exit_code in (EXIT_OK, EXIT_PREEMPTED):
                self._save()
        finally:
            if own_flag:
                preempt.restore()
            self.logger.close()
            if self.rank == 0:
                plot_loss_curves(self.run_dir)
        return exit_code
