#!/usr/bin/env bash
# Download the wheels that bench/gpu_check.sh needs on a GPU machine whose image lacks them, into .whl/.
# The lent GPU image (Python 3.12, torch, transformers, accelerate, scipy, scikit-learn, pyarrow, pandas, pytest)
# has no `datasets` (the loop's tokenized cache) nor its two extra needs, dill and multiprocess; nothing can be
# fetched there, so they travel with the working tree (`carry: [".whl"]`, about 1 MB). Pinned to the versions
# CI tests with; gpu_check.sh installs .whl/*.whl into /tmp/site when the folder is there.
# Usage (here, with internet to the package registry): bash bench/fetch_wheels.sh [PYTHON_VERSION, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -l .whl
