#!/usr/bin/env bash
# Speculative KD against lambda = 0 and lambda = 1 from a deliberately weak warm start (docs/skd_study.md):
# the student SFT'd from scratch for only 150 steps (1% test accuracy), then each arm x 3 seeds, JOBS runs at
# a time on one thread each. Rerunning resumes unfinished runs and skips finished ones.
#   OUT=runs/skd STEPS=1000 JOBS=2 bash docs/skd_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-runs/skd} STEPS=${STEPS:-1000} JOBS=${JOBS:-2}
mkdir -p "$OUT"
weak=$OUT/weak-sft150
[ -f "$weak/latest" ] || OMP_NUM_THREADS=1 python train.py --stage sft --steps 150 --eval-every 0 --out "$weak" \
  > "$OUT/weak.log" 2>&1
export START=$weak/ckpt/$(cat "$weak/latest")

arms() {
  for s in 0 1 2; do
    c="--student $START --seed $s --steps $STEPS --eval-every 100 --save-every 500"
    echo "rkl-l0-s$s|$c --lmbda 0"                                   # supervised KD on ground truth
    echo "rkl-l1-s$s|$c --lmbda 1"                                   # on-policy
    echo "skd-k3-s$s|$c --lmbda 1 --rollout skd --skd-top-k 3 --skd-replace top_k"  # as the study ran: a replacement from the top 3
  done
}

source docs/arms.sh
arms | run_arms
python eval_countdown.py --study $(ls -d "$OUT"/*-s[0-9]/) --reach rkl-l0 0.1
python eval_countdown.py --plot $(ls -d "$OUT"/*-s[0-9]/) --out docs/skd_study.png
