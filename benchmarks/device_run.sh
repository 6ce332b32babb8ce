#!/usr/bin/env bash
# One measurement call on a lent GPU machine (see docs/PERFORMANCE.md): that machine has torch, transformers and
# accelerate but not diffusers, and reaches no package index, so the wheels travel with the working tree:
#
#   pip download --no-deps -d .whl diffusers==0.42.1 importlib_metadata     # here, once; .whl/ is git-ignored
#   echo /.whl/ >> .git/info/exclude
#   # on the device, with .whl carried:
#   bash benchmarks/device_run.sh training              # the dataset-prompt rows at batch 8 (8 to 9 minutes)
#   bash benchmarks/device_run.sh sampling,encoding 200 # the sampling rows and the faithfulness check (about 4.5)
#   bash benchmarks/device_run.sh gpu-tests             # tests/test_gpu.py: no syncs, CUDA graphs = eager (1-2 min)
#
# The second argument is the benchmark's time budget in seconds (default 480 for training, else 300): optional rows
# start only while the budget holds them, and the run is stopped 60 s past it.
# DYOD_BENCH_ARGS=--tiny runs the same call at toy shapes on the CPU (a dry run). Writes $OUT/<sections>.json (after every row, so a timeout loses only the row in flight) and $OUT/<sections>.log.
set -o pipefail
sections=${1:-training}
default_budget=300
[[ $sections == training ]] && default_budget=480   # two compiled rows: the feed-forwards recomputed, then none
budget=${2:-$default_budget}
out=${OUT:-/tmp/dyod-bench}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
name=${sections//,/-}
if [[ $sections == gpu-tests ]]; then
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/$name.log"
    exit
fi
extra=()
[[ $sections == training ]] && extra=(--train-batches 8)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/$name.log"
timeout $((budget + 60)) python3 benchmarks/sd15_speed.py --sections "$sections" "${extra[@]}" \
    --json "$out/$name.json" --budget-s "$budget" ${DYOD_BENCH_ARGS:-} 2>&1 | tee -a "$out/$name.log"
