#!/usr/bin/env bash
# Issue 6's measurements on a lent GPU, as four calls of the device tool, each under its
# 10-minute limit and each on its own (a machine given back between calls loses the random
# 8B model, which `model` and `baseline` then write again). From the repository root there:
#
#   bash bench/gpu_session.sh check      # imports; kernel and GPU tests, compiled   (~3 min)
#   bash bench/gpu_session.sh kernels    # kernels, matmul and tune sections, no model (~8 min)
#   bash bench/gpu_session.sh model      # decode, load and serve with CUDA graphs     (~8 min)
#   bash bench/gpu_session.sh baseline   # the same decode without kernels; peft       (~8 min)
#   bash bench/gpu_session.sh slots      # serve with 16 adapter slots, not 64         (~6 min)
#
# Every call carries .whl (the wheels the image lacks: bench/gpu_notes.md). Logs and JSON
# results go to $OUT, at most 3 files a call.
set -uo pipefail
phase=${1:?"usage: bash bench/gpu_session.sh check|kernels|model|baseline|slots"}
out=${OUT:-/tmp/gpu-session}
mkdir -p "$out"
log="$out/$phase.log"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site

# bench SECONDS NAME ARGS...: one run of the benchmark, cut at SECONDS so the calls after it
# in this phase still run; its JSON to $OUT/NAME.json.
bench() {
    local limit=$1 name=$2
    shift 2
    timeout "$limit" python3 bench/gpu_throughput.py "$@" --out "$out/$name.json" 2>&1 |
        grep -v -e "it/s]" -e "^Loading" | tee -a "$log"
}

case $phase in
check)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$log"
    python3 -c "import serve.engine, bitsandbytes, triton; print('triton', triton.__version__)" \
        2>&1 | tee -a "$log"
    timeout 480 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
        tests/test_gpu.py 2>&1 | tail -60 | tee -a "$log"
    ;;
kernels)
    bench 200 kernels --sections kernels,matmul
    bench 360 tune --sections tune
    ;;
model)
    bench 560 model --sections decode,load,serve --cuda-graphs
    ;;
baseline)
    bench 200 reference --sections decode --kernels reference
    bench 360 peft --sections peft
    ;;
slots)
    bench 560 slots --sections serve --cuda-graphs --max-loras 16
    ;;
*)
    echo "unknown phase $phase: check, kernels, model, baseline or slots" >&2
    exit 2
    ;;
esac
