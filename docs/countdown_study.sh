#!/usr/bin/env bash
# The Countdown study (docs/countdown_study.md): each arm x 3 seeds from the shipped student, JOBS runs at a
# time on one thread each, then the table and the figures. Rerunning resumes unfinished runs and skips
# finished ones.   OUT=runs/study STEPS=1500 JOBS=2 bash docs/countdown_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-runs/study} STEPS=${STEPS:-1500} JOBS=${JOBS:-2}
mkdir -p "$OUT"

arms() {  # name|flags, seed-major so that whole seeds finish first
  for s in 0 1 2; do
    c="--seed $s --steps $STEPS --eval-every 150 --save-every 500"
    echo "sft-s$s|$c --stage sft --student checkpoints/student --augment"          # SFT on ground truth
    echo "sft-teacher-s$s|$c --stage sft --student checkpoints/student --seq-kd"   # SFT on teacher samples
    echo "rkl-l0-s$s|$c --lmbda 0"                                                  # supervised KD
    echo "rkl-l0-seqkd-s$s|$c --lmbda 0 --seq-kd"                                   # sequence-level KD
    for l in 0.25 0.5 0.75 1; do echo "rkl-l$l-s$s|$c --lmbda $l"; done            # the lambda mix
    echo "rl-s$s|$c --stage rl --samples-per-prompt 8 --lr 2e-5"                    # RL on the verifier
    echo "sampled-s$s|$c --loss sampled --samples-per-prompt 8"                     # OPD as RL, no reward
    echo "sampled+reward-s$s|$c --loss sampled --samples-per-prompt 8 --reward-weight 1"  # distill + reward
  done
}

source docs/arms.sh
arms | run_arms
dirs=$(ls -d "$OUT"/*-s[0-9]/)
python eval_countdown.py --study $dirs --reach rkl-l0 0.3 rl
main=$(ls -d "$OUT"/{sft,sft-teacher,rkl-l0,rkl-l0-seqkd,rkl-l1,rl,sampled,sampled+reward}-s[0-9]/)
python eval_countdown.py --plot $main --out docs/countdown_study.png
python eval_countdown.py --plot $(ls -d "$OUT"/rkl-l{0,0.25,0.5,0.75,1}-s[0-9]/) --out docs/countdown_lambda.png
