#!/usr/bin/env bash
# One training step, before and after a code change, on the same machine in alternating pairs (the load of a
# shared machine drifts; alternating puts both sides under the same drift). Each side runs
# benchmarks/profile_step.py from a git worktree of its commit on the same feature sets (built beforehand by
# the features job) and appends one record per run, tagged with its side, to RECORDS.jsonl.
#   bash benchmarks/step_ab.sh BEFORE AFTER RECORDS.jsonl PAIRS FEATURES:CONFIG[:KEY=VALUE,...] ...
# e.g. bash benchmarks/step_ab.sh 1ea0d8f 6b46ff5 ab.jsonl 3 \
#        work/prof/beauty-bert4rec/features:conf/benchmarks/beauty-bert4rec.yaml \
#        work/prof/beauty-bert4rec/features:conf/benchmarks/beauty-bert4rec.yaml:train.precision=bf16-mixed
set -euo pipefail
before=$1 after=$2 out=$(realpath -m "$3") pairs=$4
shift 4
python=$(realpath -s "${PYTHON:-.venv/bin/python}")
trees=$(mktemp -d)
trap 'git worktree remove --force "$trees/before"; git worktree remove --force "$trees/after"; rm -rf "$trees"' EXIT
git worktree add -q --detach "$trees/before" "$before"
git worktree add -q --detach "$trees/after" "$after"
for ((i = 1; i <= pairs; i++)); do
  for spec in "$@"; do
    IFS=: read -r features config overrides <<< "$spec"
    features=$(realpath "$features")
    IFS=, read -r -a extra <<< "${overrides:-}"
    for side in before after; do
      commit=$([ $side = before ] && echo "$before" || echo "$after")
      (cd "$trees/$side" && OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$python" -m benchmarks.profile_step \
        --features "$features" --config "$config" --device cpu --steps 40 --warmup 5 \
        --json-out "$out.tmp" "${extra[@]}" > /dev/null)
      "$python" - "$out.tmp" "$out" "$side" "$commit" "$i" <<'PY'
import json, sys, time
from benchmarks.machine import load_1min, machine
tmp, out, side, commit, pair = sys.argv[1:]
rec = json.loads(open(tmp).read().splitlines()[-1])
rec.pop("profile", None)
rec |= {"load_1min": load_1min(), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
with open(out, "a") as f:
    f.write(json.dumps(rec | {"side": side, "commit": commit, "pair": int(pair)}) + "\n")
PY
      rm -f "$out.tmp"
    done
  done
done
