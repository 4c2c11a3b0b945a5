"""The end-to-end demo: data -> teachers -> distillation -> sampling -> evaluation -> report.

    .venv/bin/python tools/demo.py [--out runs/demo] [--quick] [--launcher torchrun|deepspeed] [--smollm2]
        [--benchmarks synthetic text] [--synthetic-source chain2|switching] [--teacher-seed N]

Stages (each logs one line with the elapsed time; each is skipped when its outputs are already
complete, so rerunning the same command resumes; training stages also resume from their own
``checkpoints/latest``):

1. ``data``       Austen -> ``<run>/data/text`` (tools/prepare_data.py); the exact synthetic benchmark
                  -> ``<run>/data/synthetic`` (tools/prepare_synthetic.py). Complete = manifest.json.
2. ``teacher_*``  MDLM teachers on 2 ranks (torchrun or the deepspeed launcher from this venv),
                  configs/demo/{synthetic,text}_teacher.yaml. Complete = latest checkpoint at the
                  configured step.
3. ``distill_*``  MCD and SDTT students for a few rounds via tools/distill_rounds.py; when that tool is
                  absent or fails, the stage is reported as SKIPPED (with the reason) in the log and
                  in report.md, and the other stages still run.
   ``ideal_synthetic`` the distillation losses' population optima on the trained synthetic teacher
                  (tools/ideal_rows.py: ``mcd-ideal``, ``sdtt-ideal`` at N/16 steps, T = 0.9 and 1; ~3 min), so each
                  trained student is read against its own ceiling; report.md adds the students' share of
                  their ideal's gap closed. Complete = one JSONL per kind and temperature under ``<run>/samples/``.
4. ``sample``     teacher at N and N/16 steps at several temperatures, every student round at N/16
                  steps; one JSONL per configuration under ``<run>/samples/`` (resume unit), merged
                  with the ideal rows into ``<run>/samples.jsonl``.
5. ``evaluate``   tools/evaluate.py: exact true NLL (synthetic), Gen PPL under an AR evaluator trained
                  on the held-out split (text); report.json, report.md, plots. The table is printed.
   ``evaluate_strided`` the same models at N/16 steps drawn by the coupled sampler's strided reveal
                  order (teacher at every temperature, each student's last round), scored the same way in
                  ``<run>/strided/`` against the default sampler's teacher curves; its summary is added
                  to report.md. The main report.json and samples.jsonl stay default-sampler only.
6. ``evaluate_smollm2`` (only with ``--smollm2``) the text rows again under SmolLM2-135M, an evaluator
                  the project did not train, in ``<run>/smollm2/``.

Full mode takes 23-37 min on 2 CPU cores depending on the host (docs/results.md); ``--quick`` is a few-minute smoke
of the same pipeline.
``--benchmarks synthetic`` runs the synthetic benchmark alone (no text data, teacher, students or AR
evaluator); ``--synthetic-source switching`` puts the regime-switching source (dependencies that span the
strided sampler's stride; mcd_scale/eval/synthetic/switching.py) in place of the order-2 chain; and
``--teacher-seed`` sets the teachers' ``train.seed`` (initialisation and data order) for a seed spread.
These three choices are recorded in ``<run>/demo_options.json``; resuming a run directory with other
choices is refused (exit 2), since its data and teachers were made with the first ones.
"""
from mcd_scale.demo.plan import STRIDED, Plan, make_plan
from mcd_scale.demo.pipeline import Demo, DemoInputError, StageSkipped, trained_steps_of
from mcd_scale.demo.cli import build_parser, main

__all__ = ["STRIDED", "Plan", "make_plan", "Demo", "DemoInputError", "StageSkipped", "trained_steps_of", "build_parser", "main"]
