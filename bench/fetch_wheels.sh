#!/usr/bin/env bash
# Prepare the one device call of bench/gpu_check.sh: the wheels a lent GPU machine lacks (.whl/) and the real
# GLUE task folders it trains on (.glue/). Nothing can be fetched there, so both travel with the working tree
# (`carry: [".whl", ".glue"]`, about 15 MB); both folders are git-ignored (info/exclude).
# The lent image (Python 3.12, torch 2.11, transformers 5.17, accelerate 1.15, scipy, scikit-learn, pyarrow,
# pandas, pytest, einops, msgpack, ninja, psutil, py-cpuinfo, tqdm) has no `datasets` (the loop's tokenized
# cache) nor its extra needs dill and multiprocess, and no DeepSpeed. DeepSpeed has no wheel on PyPI: it is
# built here from its source release (`pip wheel --no-deps`: pure Python, its CUDA ops are compiled on first
# use, and the project uses none by default), with the pure-Python needs the image lacks: hjson, pydantic
# (+ pydantic-core, a binary wheel for that Python, annotated-types, typing-inspection, typing-extensions).
# Pinned to the versions CI tests with; gpu_check.sh installs .whl/*.whl into /tmp/site when the folder is there.
# Usage (here, with the package registry reachable): bash bench/fetch_wheels.sh [PYTHON_VERSION, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
exclude=$(git rev-parse --git-path info/exclude)  # .git is a file in a worktree
mkdir -p "$(dirname "$exclude")"
for folder in /.whl/ /.glue/; do
  grep -qx "$folder" "$exclude" 2>/dev/null || echo "$folder" >>"$exclude"
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0
compgen -G ".whl/deepspeed-0.19.8-*.whl" >/dev/null || python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
# the real GLUE files (../shared/glue; a checkout's ../shared does not travel): the three tasks gpu_check.sh times
SHARED=${SHARED_GLUE:-../shared/glue}
for task in RTE MRPC SST-2; do
  [[ -f $SHARED/$task/train.tsv ]] || { echo "missing $SHARED/$task/train.tsv (set SHARED_GLUE)"; exit 2; }
  mkdir -p ".glue/$task" && cp "$SHARED/$task"/{train,dev,test}.tsv ".glue/$task/"
done
ls -l .whl && du -sh .whl .glue
