#!/usr/bin/env bash
# SmolLM2-135M-Instruct into a pruned copy of itself without collapse: an off-policy cold start, then
# on-policy distillation from it (docs/real_models.md has the measured figures), on the general
# instruction prompts (data/instructions.py, --task instruct), beside the plain on-policy run that collapses.
#
#   bash docs/real_model_recipe.sh                  # seed 0, pruning 0::2, 30 + 30 steps (as measured)
#   SEED=1 bash docs/real_model_recipe.sh           # another seed (each arm's run directory ends in -s$SEED)
#   KEEP=0::3 STEPS1=15 ARMS=cold bash docs/real_model_recipe.sh   # the pruning comparison's 0::3 arm
#
# Every run writes runs/<name>/metrics.jsonl: val_rkl, val_fkl, val_greedy_agreement, val_top1_agreement,
# val_distinct2 beside val_teacher_distinct2, at step 0 (student_val_*_before) and every EVERY steps;
# the greedy replies to three held-out test prompts, before and after, are in each run's log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
SEED=${SEED:-0}
KEEP=${KEEP:-0::2}        # which teacher layers the student keeps (0::2: 15 of 30; 0::3: 10)
STEPS1=${STEPS1:-30}      # stage 1: off-policy cold start
STEPS2=${STEPS2:-30}      # stage 2: on-policy from stage 1
EVERY=${EVERY:-15}
ARMS=${ARMS:-cold recipe onpolicy control}  # which runs to make
TAG=${KEEP//:/}           # 0::2 -> 02
# measured on 2 CPU cores shared with other jobs: one thread and passive OpenMP waits ran fastest there
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
T=hf/smollm2-135m-instruct
[ -d "$T" ] || $PY tools/convert_gguf.py --out "$T"
COMMON=(--stage distill --task instruct --teacher "$T" --max-new-tokens 48 --batch-size 8 --eval-n 16
        --eval-every "$EVERY" --seed "$SEED")
mkdir -p runs/logs

# Stage 1, the cold start: sequence-level KD, forward KL on the teacher's samples only (lambda 0). The
# student never trains on its own noise, so there is no cheap mode for it to find.
S1=runs/instruct-cold-k$TAG-s$SEED
if [[ " $ARMS " == *" cold "* ]]; then $PY train.py "${COMMON[@]}" --student "$T" --keep-layers "$KEEP" --lmbda 0 --seq-kd --loss fkl \
    --lr 1e-4 --warmup 5 --steps "$STEPS1" --save-every "$STEPS1" --out "$S1" 2>&1 | tee runs/logs/${S1#runs/}.log; fi

# Stage 2, on-policy from stage 1's checkpoint (a run directory: its latest checkpoint, already pruned, so no
# --keep-layers): half the rows the student's samples, half the teacher's (GKD's lambda 0.5 with seq-KD), each
# token's loss half forward and half reverse KL, so the forward term keeps the student's mass on all of the
# teacher's modes while the on-policy rows correct the states the student itself reaches.
S2=runs/instruct-recipe-k$TAG-s$SEED
if [[ " $ARMS " == *" recipe "* ]]; then $PY train.py "${COMMON[@]}" --student "$S1" --lmbda 0.5 --seq-kd --loss fkl_rkl --beta 0.5 \
    --lr 5e-5 --warmup 5 --steps "$STEPS2" --save-every "$STEPS2" --out "$S2" 2>&1 | tee runs/logs/${S2#runs/}.log; fi

# The cautionary arm: plain on-policy reverse KL from the pruned start (today's demo on these prompts).
B=runs/instruct-onpolicy-k$TAG-s$SEED
if [[ " $ARMS " == *" onpolicy "* ]]; then $PY train.py "${COMMON[@]}" --student "$T" --keep-layers "$KEEP" --lmbda 1 --loss rkl \
    --lr 1e-5 --warmup 5 --steps "$STEPS2" --save-every "$STEPS2" --out "$B" 2>&1 | tee runs/logs/${B#runs/}.log; fi

# The control for stage 2: the cold start alone, continued for as many steps at the same learning rate (no
# on-policy rows, forward KL only). Stage 2 must beat this, not only its own start. Alone:
#   ARMS=control bash docs/real_model_recipe.sh
C=runs/instruct-coldmore-k$TAG-s$SEED
if [[ " $ARMS " == *" control "* ]]; then $PY train.py "${COMMON[@]}" --student "$S1" --lmbda 0 --seq-kd --loss fkl \
    --lr 5e-5 --warmup 5 --steps "$STEPS2" --save-every "$STEPS2" --out "$C" 2>&1 | tee runs/logs/${C#runs/}.log; fi
