#!/usr/bin/env bash
# One measurement call on a lent GPU machine (see docs/PERFORMANCE.md): that machine has torch, transformers and
# accelerate but not diffusers, and reaches no package index, so the wheels travel with the working tree:
#
#   pip download --no-deps -d .whl diffusers==0.42.1 importlib_metadata     # here, once; .whl/ is git-ignored
#   echo /.whl/ >> .git/info/exclude
#   # on the device, with .whl carried, in this order (each within the 30 s the machine stays warm after the last):
#   bash benchmarks/device_run.sh table                  # the whole table, compiled training first (5-6.5 minutes)
#   bash benchmarks/device_run.sh gpu-tests              # tests/test_gpu.py: no syncs, CUDA graphs = eager (1-2 min)
#   bash benchmarks/device_run.sh sampling,encoding 200  # compiled sampling and its variants (the budget left, less 1)
#   bash benchmarks/device_run.sh training               # every training row at batch 8 (8-9 minutes: a later session)
#
# The second argument is the benchmark's time budget in seconds (default 330 for the table, 480 for training, else
# 300): optional rows start only while the budget holds them, and the run is stopped 60 s past it.
# DYOD_BENCH_ARGS=--tiny runs the same call at toy shapes on the CPU (a dry run). Writes $OUT/<name>.json (after every
# row, so a timeout loses only the row in flight) and $OUT/<name>.log.
set -o pipefail
plan=${1:-table}
extra=()
case $plan in
    table) sections=sampling,training,encoding; default_budget=330 ;;  # batch 1, 4 and 8, as sd15_speed.py's default
    training) sections=training; default_budget=480; extra=(--train-batches 8) ;;  # two compiled rows
    *) sections=$plan; default_budget=300 ;;
esac
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
# inductor's compiled graphs and kernels, in the working tree (git-ignored), which the machine keeps between calls: a
# graph one call compiled loads in seconds in the next (benchmarks/compile_time.py: 62 s -> 7 s on the CPU)
export TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor-cache
name=${plan//,/-}
if [[ $plan == gpu-tests ]]; then
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/$name.log"
    exit
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/$name.log"
# shellcheck disable=SC2086  # DYOD_BENCH_ARGS is a list of flags
timeout $((budget + 60)) python3 benchmarks/sd15_speed.py --sections "$sections" "${extra[@]}" \
    --json "$out/$name.json" --budget-s "$budget" ${DYOD_BENCH_ARGS:-} 2>&1 | tee -a "$out/$name.log"
