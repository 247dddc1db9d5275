#!/usr/bin/env bash
# Event types as model input on the Taobao UserBehavior sample (4 types: pv, cart, fav, buy): the plain model
# against model.event_types=true, seeds 42-44, each trained to convergence (patience 10, no time budget, so
# the result does not depend on the machine's load), both protocols of benchmarks/repeat_protocol.py.
#   bash benchmarks/event_types.sh [RECORDS.jsonl] [WORK_ROOT]       (from the repository root)
# then: python -m benchmarks.repeat_protocol --from-json RECORDS.jsonl   (rows into BENCHMARKS.md)
set -euo pipefail
out=${1:-work/event-types.jsonl}
root=${2:-work/event-types}
python=${PYTHON:-python}
for seed in 42 43 44; do
  for arm in base types; do
    extra=()
    [ "$arm" = types ] && extra=(model.event_types=true)
    "$python" -m benchmarks.repeat_protocol --no-table --json-out "$out" --work "$root/$arm-$seed" \
      train.seed="$seed" train.max_time_s=null train.max_epochs=300 train.patience=10 "${extra[@]}"
  done
done
