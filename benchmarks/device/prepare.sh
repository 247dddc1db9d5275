#!/usr/bin/env bash
# Builds .gpu/, the folder a session carries to the lent GPU machine (the device tool's `carry`), from scratch:
#   wheels  what the GPU image lacks for the benchmarks (polars, pydantic; it has torch, Lightning, numpy,
#           pandas, pyyaml; faiss and mlflow are not needed with tracking.enabled=false: both import lazily)
#   data    the benchmark files from ../shared/data, gzipped (never committed; the device sees only the repository)
#   COMMIT  HEAD's short hash (+dirty), which the records name (the device copy's git metadata is not this checkout's)
# Then, from the device tool:  run(command="bash benchmarks/device/run.sh ...", carry=[".gpu"]) on a clean tree.
# .gpu/ is ignored through .git/info/exclude. ~60 MiB, of the 64 MiB a call may carry with the working tree
# (polars' runtime wheel alone is 54 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA_ROOT:-../shared/data}"
mkdir -p "$(git rev-parse --git-dir)/info"
EXCLUDE="$(git rev-parse --git-dir)/info/exclude"
grep -qx "/.gpu/" "$EXCLUDE" 2>/dev/null || echo "/.gpu/" >> "$EXCLUDE"
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/data/ml-1m .gpu/data/amazon-beauty-s3rec .gpu/data/amazon-beauty-bert4rec
PY=${PYTHON:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
wheels=()
for pkg in polars polars-runtime-32 pydantic pydantic-core annotated-types typing-inspection; do
  wheels+=("$pkg==$(version "$pkg")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels "${wheels[@]}"
for file in ml-1m/ml-1m.txt ml-1m/movies.dat ml-1m/sas_to_original_items.txt amazon-beauty-s3rec/Beauty.txt \
            amazon-beauty-bert4rec/beauty.txt; do
  gzip -c "$DATA/$file" > ".gpu/data/$file.gz"
done
"$PY" -c "from benchmarks.machine import commit; print(commit())" > .gpu/COMMIT
git ls-files -z | xargs -0 sha256sum > .gpu/MANIFEST  # run.sh: a tree changed since then is not that commit
du -sh .gpu; cat .gpu/COMMIT
