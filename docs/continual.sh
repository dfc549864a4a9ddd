#!/usr/bin/env bash
# The continual-learning recipe (docs/continual.md), 3 seeds, one after another on one thread:
#   1. start: a Countdown model (checkpoints/teacher, 70% test);
#   2. SFT on a new task, arithmetic (data/arith.py), until Countdown is forgotten;
#   3. recovery: on-policy distillation with the start checkpoint as teacher on Countdown prompts, half of
#      every batch the new task's ground truth by cross-entropy (--sft-mix).
# Rerunning skips finished phases.   OUT=runs/continual bash docs/continual.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/continual}
mkdir -p "$OUT"
START=checkpoints/teacher
for s in 0 1 2; do
  sft=$OUT/arith-sft-s$s rec=$OUT/recover-s$s
  grep -qs student_test_accuracy_after "$sft/metrics.jsonl" || OMP_NUM_THREADS=1 python train.py --stage sft \
    --task arith --student $START --seed $s --steps 300 --lr 1e-3 --eval-every 100 --out "$sft" > "$sft.log" 2>&1
  grep -qs student_test_accuracy_after "$rec/metrics.jsonl" || OMP_NUM_THREADS=1 python train.py --stage distill \
    --student "$sft" --teacher $START --sft-mix arith --lmbda 0.5 --lr 5e-4 --seed $s --steps 400 \
    --eval-every 100 --out "$rec" > "$rec.log" 2>&1
  echo "done seed $s"
done
python - "$OUT" <<'PY'
import json, sys, statistics as st
def last(d):
    recs = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
    return {k: v for r in recs for k, v in r.items()}
rows = []
for s in (0, 1, 2):
    a, r = last(f"{sys.argv[1]}/arith-sft-s{s}"), last(f"{sys.argv[1]}/recover-s{s}")
    rows.append(dict(start=(r["teacher_test_accuracy"], a["student_test_accuracy_before"]),
                     sft=(r["student_test_accuracy_before"], a["student_test_accuracy_after"]),
                     recovered=(r["student_test_accuracy_after"], r["mix_test_accuracy_after"])))
print("| phase | Countdown test | arithmetic test |\n|---|---|---|")
for ph in ("start", "sft", "recovered"):
    c, a = [100 * x[ph][0] for x in rows], [100 * x[ph][1] for x in rows]
    print(f"| {ph} | {st.mean(c):.1f} +- {st.stdev(c):.1f} | {st.mean(a):.1f} +- {st.stdev(a):.1f} |")
PY
