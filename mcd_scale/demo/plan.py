"""The demo's sizes (:class:`Plan`) and the ``--quick`` plan."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from mcd_scale.demo.paths import ROOT
from mcd_scale.config import load_config

STRIDED = "coupled-strided"  # report name of the coupled sampler with reveal_order="strided"


@dataclass
class Plan:
    """Every size of the demo; ``quick`` shrinks them all."""
    # Measured: 33 min 55 s on 2 idle cores, strided rows included (docs/results.md). The synthetic benchmark is a sparse
    # chain at L = 256 (docs/evaluation.md): teacher@256 needs ~163 network calls per sample there
    # (nothing to recompute on steps that reveal nothing), so 16 steps is a ~10x saving; at L = 64 it
    # would be only ~3.5x.
    syn_seq_len: int = 256
    syn_train: int = 16384
    syn_eval: int = 256
    text_seq_len: int = 128
    syn_steps: int = 1500  # 417 s in the measured run (~15k tokens/s, 2 ranks)
    text_steps: int = 500
    model_overrides: list = field(default_factory=list)
    many_steps: int = 256
    # Teachers at N and N/16 steps are sampled at every temperature (the frontiers); the last round of
    # each student at student_temperatures (its own frontier), earlier rounds at 1.0.
    # Down to 0.5: distilled students sit at lower entropy than the teacher at T = 0.7 (measured), and a
    # student outside the teacher curves cannot be compared.
    # And T = 0.9: students and ideals are sampled at 0.9, and a read on the chord between 0.8 and 1 of a
    # convex curve flatters them (docs/ceiling.md); the summary names any temperature a curve lacks.
    temperatures: tuple = (0.5, 0.7, 0.8, 0.9, 1.0)
    # Text adds T = 0.9 (~25 s): Gen PPL climbs steeply between T = 0.8 and 1 (990 -> 3400 under SmolLM2),
    # where most text students sit, and a read between points that far apart is coarse (docs/results.md).
    text_temperatures: tuple = (0.5, 0.7, 0.8, 0.9, 1.0)
    student_temperatures: tuple = (0.8, 0.9, 1.0)
    num_samples: int = 64  # synthetic samples per (model, steps, temperature)
    # Text teacher@256 costs 0.65-1.7 s/sample (~100 calls, full-vocabulary logits at every position):
    # fewer text than synthetic samples keep the sampling stage near 7 minutes (409 s measured).
    text_num_samples: int = 32
    ar_steps: int = 300
    # Synthetic distillation: dt doubles each round, and dt0 is derived per objective
    # (mcd_scale.distill.rounds.dt0_for_sampler_steps) so that the last round of every objective learns
    # the jump 1/few_steps it is sampled with: MCD dt0 = 1/32, SDTT (2 teacher steps per jump) 1/64.
    rounds: int = 2
    distill_steps: int = 150
    # Text distillation (same objectives and temperature schedule; its own rounds and steps).
    text_rounds: int = 2
    # 75 (synthetic: 150): at 150 the two text objectives took 513 s of the demo, and text shows no
    # many-vs-few-step gap to close (docs/results.md).
    text_distill_steps: int = 75
    distill_limit: int = 512  # trajectories precomputed per round (train samples; reused across epochs)
    # Rows per sampler call, for every model alike. On 2 CPU cores 16 rows were never slower per sample
    # than 64 and once ~30% faster for the 16-step student (0.075 vs 0.107 s/sample; another run:
    # 0.077 vs 0.079, docs/results.md), and they keep teacher and students at the same batch.
    sample_batch: int = 16
    distill_benchmarks: tuple = ("synthetic", "text")
    distill_overrides: list = field(default_factory=list)
    # The distillation losses' population optima on the synthetic teacher (tools/ideal_rows.py; docs/method.md
    # section 5, docs/log.md "ideal"): each trained student is read against its own ceiling. One process
    # per (kind, temperature), one thread each, --nproc at a time. Per sample at L = 256 (posterior draws, K
    # teacher calls and the per-token solver per step), two processes side by side on 2 cores: mcd-ideal 9.9 s
    # with the nested-bisection solver, 2.9-4.0 s with the closed-form one (mcd_scale/distill/ideal.py);
    # sdtt-ideal 2.9 s per temperature. 24 samples at 2 temperatures: 165 s in the full demo; their intervals
    # stay wide (~+-0.2 of the gap), a reference, not a result. Both also at T = 0.9: at T = 1 each has sat
    # just above the teacher curves' entropy range, where no gap closed is defined (sdtt-ideal 3.785 vs 3.778
    # on the seed-1 teacher, mcd-ideal 3.733 vs 3.73 on seed 2).
    # "mcd-ceiling" is the honest ceiling (docs/ceiling.md): the same optimum with the teacher's own 64-step
    # continuations as data (no oracle draws) and independent draw sets per position class. It costs ~20
    # CPU-seconds per sample at L = 64, K = 8 (measured on a loaded machine), estimated 5-10x that at L = 256:
    # a few samples at T = 1, K = 4, so the demo's extra time stays a few minutes (an estimate); its
    # interval is wide, a reference.
    ideal_kinds: tuple = ("mcd-ideal", "sdtt-ideal", "mcd-ceiling")
    ideal_temperatures: dict = field(default_factory=lambda: {"mcd-ideal": (0.9, 1.0), "sdtt-ideal": (0.9, 1.0),
                                                              "mcd-ceiling": (1.0,)})
    ideal_samples: int = 24
    ideal_draws: int = 12  # K coupled continuations per state and step (the estimate's Monte-Carlo error)
    ceiling_samples: int = 8
    ceiling_draws: int = 4
    ceiling_groups: int = 3
    ceiling_continuation_steps: int = 64
    # Benchmarks also sampled by the coupled sampler's strided reveal order at N/16 steps (no two tokens
    # closer than N/16 revealed in one step; docs/diffusion.md): the sampler that closes the synthetic gap
    # without distillation (docs/log.md, "Reveal order"), so each student is also read against its
    # teacher sampled that way.
    strided_benchmarks: tuple = ("synthetic", "text")
    # What the demo runs on (flags; recorded in <run>/demo_options.json): the benchmarks, the synthetic
    # source (tools/prepare_synthetic.py --source) and the teachers' train.seed (None: the config's).
    benchmarks: tuple = ("synthetic", "text")
    synthetic_source: str = "chain2"
    teacher_seed: Optional[int] = None

    def options(self) -> dict:
        """The choices a run directory is made with; a resume must use the same ones."""
        return {"benchmarks": sorted(self.benchmarks), "synthetic_source": self.synthetic_source,
                "teacher_seed": self.teacher_seed}

    def ideal_temps(self, kind: str) -> tuple:
        return tuple(self.ideal_temperatures.get(kind, (1.0,)))

    def ideal_samples_of(self, kind: str) -> int:
        return self.ceiling_samples if kind == "mcd-ceiling" else self.ideal_samples

    def ideal_draws_of(self, kind: str) -> int:
        return self.ceiling_draws if kind == "mcd-ceiling" else self.ideal_draws

    @property
    def runs_ideal(self) -> bool:
        """Whether the demo samples the ideal rows (stage ideal_synthetic)."""
        return "synthetic" in self.benchmarks and bool(self.ideal_kinds) and self.ideal_samples > 0

    @property
    def few_steps(self) -> int:
        return max(self.many_steps // 16, 1)

    def distill_schedule(self, bench: str, objective: str) -> tuple[int, float, int]:
        """(rounds, dt0, steps per round) of one benchmark's distillation by ``objective``: dt0 is the one
        whose last round learns the few-step jump (fair SDTT, docs/method.md section 5)."""
        # lazy: loads torch; importing this module does not need it
        from mcd_scale.distill.rounds import dt0_for_sampler_steps

        rounds, steps = ((self.rounds, self.distill_steps) if bench == "synthetic"
                         else (self.text_rounds, self.text_distill_steps))
        return rounds, dt0_for_sampler_steps(self.distill_config(bench), objective, self.few_steps, rounds), steps

    def distill_config(self, bench: str):
        """The demo's distillation config (configs/demo/distill.yaml on the benchmark's teacher config)."""
        return load_config([os.path.join(ROOT, f"configs/demo/{bench}_teacher.yaml"),
                            os.path.join(ROOT, "configs/demo/distill.yaml")], list(self.distill_overrides)).distill


def make_plan(quick: bool) -> Plan:
    if not quick:
        return Plan()
    small = ["model.hidden=64", "model.layers=2", "model.heads=2", "model.ffn_hidden=128",
             "parallel.micro_batch=4", "parallel.global_batch=8", "schedule.warmup_steps=5"]
    # --quick: tiny models, 1 round, and only the synthetic benchmark is distilled (text distillation is
    # reported as skipped in report.md); sizes chosen so CI finishes in a few minutes on 2 loaded cores.
    return Plan(syn_seq_len=32, syn_train=1024, syn_eval=64, text_seq_len=32, syn_steps=16, text_steps=10,
                model_overrides=small, many_steps=32, temperatures=(0.9, 1.0), text_temperatures=(0.9, 1.0),
                student_temperatures=(0.9, 1.0), num_samples=8, text_num_samples=8, ar_steps=10,
                rounds=1, distill_steps=4, distill_limit=32, distill_benchmarks=("synthetic",),
                distill_overrides=small, ideal_samples=4, ideal_draws=2, ceiling_samples=4, ceiling_draws=2,
                ceiling_continuation_steps=8)
