#!/usr/bin/env bash
# Event types on the Taobao UserBehavior sample (4 types: pv, cart, fav, buy), seeds 42-44, each run trained to
# convergence (patience 10, no time budget, so the result does not depend on the machine's load), both
# protocols of benchmarks/repeat_protocol.py. Arms (ARMS, default "base types"):
#   base          SASRec as configured (conf/benchmarks/nightly-taobao.yaml)
#   types         + model.event_types=true (the event's type embedded at each input position)
#   repeat        + model.repeat_bias=true (recency bonus of the user's own items)
#   repeat-types  + both (the repeat bonus also by the type of the window event)
#   ARMS="repeat repeat-types" bash benchmarks/event_types.sh [RECORDS.jsonl] [WORK_ROOT]   (repository root)
# then: python -m benchmarks.repeat_protocol --from-json RECORDS.jsonl   (rows into BENCHMARKS.md)
set -euo pipefail
out=${1:-work/event-types.jsonl}
root=${2:-work/event-types}
python=${PYTHON:-python}
for seed in 42 43 44; do
  for arm in ${ARMS:-base types}; do
    case $arm in
      base) extra=() ;;
      types) extra=(model.event_types=true) ;;
      repeat) extra=(model.repeat_bias=true evaluate.item_block_size=null) ;;
      repeat-types) extra=(model.repeat_bias=true evaluate.item_block_size=null model.event_types=true) ;;
      *) echo "unknown arm $arm" >&2; exit 2 ;;
    esac
    "$python" -m benchmarks.repeat_protocol --no-table --json-out "$out" --work "$root/$arm-$seed" \
      train.seed="$seed" train.max_time_s=null train.max_epochs=300 train.patience=10 "${extra[@]}"
  done
done
