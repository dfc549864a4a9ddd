# Sourced by the study scripts: `arms | run_arms` runs each "name|train.py flags" line as a run in $OUT/name,
# $JOBS at a time on one thread each. A finished run is skipped and an unfinished one resumed, so a study
# can be stopped and started again.

one() {
  name=${1%%|*} flags=${1#*|} dir=$OUT/${1%%|*}
  if grep -qs student_test_accuracy_after "$dir/metrics.jsonl"; then return; fi
  resume=$([ -f "$dir/latest" ] && echo --resume || true)
  OMP_NUM_THREADS=1 python train.py $flags --out "$dir" $resume > "$OUT/$name.log" 2>&1 \
    && echo "done $name" || echo "FAILED $name (see $OUT/$name.log)"
}
export -f one

run_arms() {
  local start=$(date +%s)
  xargs -P "$JOBS" -I{} bash -c 'one "{}"'
  echo "runs: $(( ($(date +%s) - start) / 60 )) min"
}
