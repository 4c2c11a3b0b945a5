#!/usr/bin/env bash
# Continue a synthetic demo teacher to more steps, then rerun the demo's distillation protocol (offline
# MCD and SDTT, 2 rounds x 150 steps, dt0 1/32) and sampling grid, and evaluate exactly. This is how the
# "longer-trained teacher" sections of docs/results.md were measured (4000 and 10,000 steps).
#
#   bash tools/experiments/stronger_teacher.sh SOURCE_TEACHER_RUN_DIR STEPS OUT_DIR [DATA_DIR]
#   bash tools/experiments/stronger_teacher.sh runs/demo/synthetic_teacher 4000 runs/teacher4000
#
# Needs a finished demo (its synthetic data and teacher). ~0.28 s per teacher step on 2 CPU cores, plus
# ~6 min of distillation and ~8 min of sampling.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=${1:?source teacher run dir}; STEPS=${2:?teacher steps}; OUT=${3:?output dir}
DATA=${4:-runs/demo/data/synthetic}
DISTILL_STEPS=${DISTILL_STEPS:-150}; NUM_SAMPLES=${NUM_SAMPLES:-64}  # smaller only for a smoke run
PY=.venv/bin/python
LAUNCH="$PWD/.venv/bin/torchrun --standalone --nproc_per_node 2"
mkdir -p "$OUT"
[ -d "$OUT/teacher" ] || cp -r "$SRC" "$OUT/teacher"  # resumes from the source's latest checkpoint
$LAUNCH -m mcd_scale.train --config configs/demo/synthetic_teacher.yaml \
  --set run.dir="$OUT/teacher" --set data.path="$DATA" --set model.seq_len=256 \
  --set train.steps="$STEPS" --set checkpoint.every=1000 --set train.eval_every=500 --set train.log_every=100 \
  > "$OUT/teacher.log" 2>&1
for obj in mcd sdtt; do
  $PY tools/distill_rounds.py --objective $obj --mode offline --limit 512 --rounds 2 --teacher "$OUT/teacher" \
    --config configs/demo/synthetic_teacher.yaml configs/demo/distill.yaml --run-dir "$OUT/$obj" \
    --launcher "$LAUNCH" --set data.path="$DATA" --set model.seq_len=256 \
    --set distill.dt0=0.03125 --set distill.steps_per_round=$DISTILL_STEPS --set train.eval_every=75 --set train.log_every=15 \
    > "$OUT/$obj.log" 2>&1
done
OUT="$OUT" NUM_SAMPLES="$NUM_SAMPLES" $PY - <<'PY'
import json, os, sys
sys.path[:0] = ["tools", "."]
import sample as S
out_dir, rows = os.environ["OUT"], []
def run(model, rnd, path, steps, temps, n=int(os.environ["NUM_SAMPLES"])):
    m = S.load_model(path)
    for T in temps:
        res = S.sample(m, steps, n, seed=0, temperature=T, sampler="ancestral", batch_size=16)
        for text, ids in zip(S.decode_rows(res.tokens, None), res.tokens):
            rows.append(json.dumps(dict(benchmark="synthetic", model=model, round=rnd, steps=steps, temperature=T,
                                        text=text, ids=ids.tolist(), nfe=res.nfe, seconds_per_sample=res.seconds / n)))
        print(model, rnd, steps, T, f"{res.seconds / n:.4f} s/sample", flush=True)
for steps in (256, 16):
    run("teacher", 0, f"{out_dir}/teacher", steps, (0.5, 0.7, 0.8, 1.0))
for obj in ("mcd", "sdtt"):
    run(obj, 1, f"{out_dir}/{obj}/round_0", 16, (1.0,))
    run(obj, 2, f"{out_dir}/{obj}/round_1", 16, (0.8, 0.9, 1.0))
open(f"{out_dir}/samples.jsonl", "w").write("\n".join(rows) + "\n")
PY
$PY tools/evaluate.py --samples "$OUT/samples.jsonl" --run-dir "$OUT/eval" \
  --synthetic-chain "$DATA/chain.json" --reference-samples 64
