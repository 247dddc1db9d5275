#!/usr/bin/env bash
# One device call on the lent GPU machine, over the .gpu/ folder of benchmarks/device/prepare.sh:
#   bash benchmarks/device/run.sh <sweep file> [seeds] [processes] [budget s] [extra KEY=VALUE ...]
# e.g. bash benchmarks/device/run.sh benchmarks/sweeps/round6.txt 42,43,44 12 420
# Installs the wheels into /tmp/site, unpacks the data into /tmp/data, runs the sweep from the repository root
# (the working tree that travelled: prepare .gpu/ on a clean HEAD, whose hash .gpu/COMMIT gives the records),
# and leaves the JSON records and logs under $OUT (they come back to this machine). The sweep's candidates are
# scored on validation only; the best line per dataset (mean validation NDCG@10) is then resumed (its training
# finished: nothing retrains) and scored on the test split, once, as PROTOCOL.md asks: $OUT/<name>-chosen.jsonl,
# whose rows `python -m benchmarks.sequential --from-json` writes.
set -uo pipefail
SWEEP=${1:?sweep file}; SEEDS=${2:-42,43,44}; PAR=${3:-12}; BUDGET=${4:-420}; shift $(( $# < 4 ? $# : 4 ))
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/logs"
PY=${PYTHON:-python3}  # PYTHON=.venv/bin/python SKIP_WHEELS=1: a dry run of this script on a machine with the venv
if [ -z "${SKIP_WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 RECSYS_BENCH_COMMIT="$(cat .gpu/COMMIT)"
# the tracked files as prepare.sh hashed them, or the records say the code is not that commit's
if [ -f .gpu/MANIFEST ] && ! sha256sum --quiet -c .gpu/MANIFEST > /dev/null 2>&1; then
  RECSYS_BENCH_COMMIT="$RECSYS_BENCH_COMMIT+changed-since-prepare"; echo "code changed since prepare.sh: $RECSYS_BENCH_COMMIT"
fi
(cd .gpu/data && find . -name '*.gz' | while read -r f; do mkdir -p "/tmp/data/$(dirname "$f")"; gunzip -c "$f" > "/tmp/data/${f%.gz}"; done)
"$PY" -m benchmarks.item_attributes --data-root /tmp/data > "$OUT/logs/item-attributes.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
name=$(basename "$SWEEP" .txt)
COMMON=(tracking.enabled=false 'evaluate.baselines=[popularity]' train.patience=20 "train.max_time_s=$BUDGET" "$@")
timeout $(( BUDGET + 150 )) "$PY" -m benchmarks.sweep "$SWEEP" --parallel "$PAR" --seeds "$SEEDS" \
  --data-root /tmp/data --json-out "$OUT/$name.jsonl" --log-dir "$OUT/logs" --set "${COMMON[@]}"
status=$?
if [ -f "$OUT/$name.jsonl" ] && "$PY" -m benchmarks.sweep "$SWEEP" --best "$OUT/$name.jsonl" --top 1 > "$OUT/$name-chosen.txt"; then
  echo "chosen on validation:"; cat "$OUT/$name-chosen.txt"
  timeout 240 "$PY" -m benchmarks.sweep "$OUT/$name-chosen.txt" --parallel "$PAR" --seeds "$SEEDS" --test --resume \
    --data-root /tmp/data --json-out "$OUT/$name-chosen.jsonl" --log-dir "$OUT/logs/chosen" --set "${COMMON[@]}" \
    || status=$?
fi
echo "commit $RECSYS_BENCH_COMMIT"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
if [ $status -ne 0 ] && [ -f "$OUT/$name.jsonl" ]; then  # the sweep ranks what finished itself, unless cut off
  "$PY" -m benchmarks.sweep "$SWEEP" --rank "$OUT/$name.jsonl" 2>&1 | tail -30
fi
exit $status
