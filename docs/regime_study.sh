#!/usr/bin/env bash
# The published regime (docs/regime_study.md): a student with about a third of the teacher's parameters,
# warm-started by SFT to about half the teacher's accuracy; its SFT ceiling; the lambda table x 3 seeds per
# divergence; and the sparse-reward comparison (OPD against RL from a weaker warm start, one FLOP axis).
# Rerunning resumes unfinished runs and skips finished ones.
#
#   bash docs/regime_study.sh                      # everything, 2 runs at a time
#   PARTS="student lambda" LOSSES=rkl bash docs/regime_study.sh   # some of it
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-runs/regime} STEPS=${STEPS:-1500} JOBS=${JOBS:-2}
PARTS=${PARTS:-student ceiling rates lambda long sparse-rates sparse}
LOSSES=${LOSSES:-rkl fkl jsd}
mkdir -p "$OUT"
source docs/arms.sh
has() { [[ " $PARTS " == *" $1 "* ]]; }
S=checkpoints/student-mid  # the shipped warm start (part `student` remakes it in $OUT/student-mid)

# 1. The student: 3 layers, width 96, MLP 288 (282k parameters, 1/2.8 of the teacher's 793k; the published
#    pair is about 1/2.7), SFT on the solver's ground truth as the shipped student was made, for 1000 steps.
#    Its ceiling: the same SFT continued from it for 2000 more steps.
if has student; then
  echo "student-mid|--stage sft --n-layer 3 --n-head 4 --d-model 96 --d-mlp 288 --steps 1000 --warmup 100 --augment --eval-every 250 --save-every 250" | run_arms
fi
if has ceiling; then
  echo "sft-ceiling|--stage sft --student $S --augment --steps 2000 --eval-every 250 --save-every 500" | run_arms
fi

# 2. The learning rate per arm: lambda 0 and 1 (reverse KL, seed 0) at three rates for the whole run (a
#    fixed FLOP budget per arm), and a fourth for lambda 1, whose best of the three was the highest. The rate
#    with the best final val accuracy serves the table: RATE_L0 for lambda 0, RATE for lambda > 0 (their
#    rows are partly or wholly on-policy). The chosen rates' runs are seed 0 of the table.
if has rates; then
  { for lr in 2e-5 6e-5 2e-4 6e-4; do echo "1 $lr"; done; for lr in 2e-5 6e-5 2e-4; do echo "0 $lr"; done; } |
  while read l lr; do
    echo "rkl-l$l-lr$lr-s0|--student $S --loss rkl --lmbda $l --lr $lr --seed 0 --steps $STEPS --eval-every 150 --save-every 500"
  done | run_arms
fi

# 3. The lambda table: every lambda x 3 seeds x each divergence (jsd: beta 0.5, TRL's default), 64 rows a step.
RATE=${RATE:-2e-4} RATE_L0=${RATE_L0:-2e-5}
if has lambda; then
  for loss in $LOSSES; do for s in 0 1 2; do for l in 0 0.25 0.5 0.75 1; do
    lr=$([ $l = 0 ] && echo $RATE_L0 || echo $RATE)
    echo "$loss-l$l-lr$lr-s$s|--student $S --loss $loss --lmbda $l --lr $lr --seed $s --steps $STEPS --eval-every 150 --save-every 500"
  done; done; done | run_arms
  for loss in $LOSSES; do
    dirs=$(ls -d "$OUT"/$loss-l0-lr$RATE_L0-s[0-9]/ "$OUT"/$loss-l{0.25,0.5,0.75,1}-lr$RATE-s[0-9]/ 2>/dev/null) || continue
    python eval_countdown.py --study $dirs
    python eval_countdown.py --plot $dirs --out docs/regime_lambda_$loss.png
  done
fi

# 3b. The plateau: the table's best arm (reverse KL, lambda = 1) and lambda = 0 (one seed) for 4x the steps,
#     to see where each stops rising: is the budget what holds lambda = 1 at ~62% of the teacher?
LONG=$((4 * STEPS))
if has long; then
  { for s in 0 1 2; do echo "1 $RATE $s"; done; echo "0 $RATE_L0 0"; } | while read l lr s; do
    echo "rkl-l$l-lr$lr-$LONG-s$s|--student $S --loss rkl --lmbda $l --lr $lr --seed $s --steps $LONG --eval-every 300 --save-every 1000"
  done | run_arms
  arms=$(ls -d "$OUT"/rkl-l{0,1}-lr*-$LONG-s[0-9]/ 2>/dev/null || true)
  python eval_countdown.py --study $arms
  python eval_countdown.py --plot $arms --out docs/regime_long.png
fi

# 4. Sparse reward: the same student after only 500 SFT steps, whose samples solve few problems, so most of
#    RL's groups of 8 hold no success (train.py logs that share as group_success). OPD (reverse KL, lambda 1),
#    RL (at three rates) and distillation plus reward from it, on one FLOP axis.
W=$OUT/student-weak
if has student; then
  echo "student-weak|--stage sft --n-layer 3 --n-head 4 --d-model 96 --d-mlp 288 --steps 500 --warmup 50 --augment --eval-every 250 --save-every 250" | run_arms
fi
if has sparse-rates; then  # RL's rate, as the rates above: the whole run, seed 0; the chosen one is seed 0 of rl
  for lr in 5e-6 2e-5 8e-5; do
    echo "sparse-rl-lr$lr-s0|--student $W --stage rl --samples-per-prompt 8 --lr $lr --seed 0 --steps $STEPS --eval-every 150 --save-every 500"
  done | run_arms
fi
RATE_RL=${RATE_RL:-5e-6}  # the sparse-rates sweep's choice
if has sparse; then  # distillation plus reward takes OPD's rate (not swept)
  { for s in 0 1 2; do
      c="--student $W --seed $s --steps $STEPS --eval-every 150 --save-every 500"
      echo "sparse-opd-lr$RATE-s$s|$c --loss rkl --lmbda 1 --lr $RATE"
      echo "sparse-rl-lr$RATE_RL-s$s|$c --stage rl --samples-per-prompt 8 --lr $RATE_RL"
    done
    for s in 0 1 2; do
      echo "sparse-sampled+reward-lr$RATE-s$s|--student $W --seed $s --steps $STEPS --eval-every 150 --save-every 500 --loss sampled --samples-per-prompt 8 --reward-weight 1 --lr $RATE"
    done; } | run_arms
  arms=$(ls -d "$OUT"/sparse-{opd-lr$RATE,rl-lr$RATE_RL,sampled+reward-lr$RATE}-s[0-9]/ 2>/dev/null || true)
  python eval_countdown.py --study $arms --reach sparse-rl-lr$RATE_RL
  python eval_countdown.py --plot $arms --out docs/regime_sparse.png
fi
