#!/usr/bin/env bash
# Issue 6's measurements on a lent GPU in ONE call of the device tool. A task's lease is 15
# minutes of device time in all, the machine's start (1-2 minutes) included, so the call is
# budgeted: every stage is cut at what is left of BUDGET seconds (default 540), and a rerun of
# the tests stage still fits what the lease has left (900 s - start - 570), if it is sent at
# once: the machine goes back 30 s after a call, and none starts with under 4 minutes left.
# Here, once, first:
#
#   bash bench/gpu_session.sh wheels     # the wheels the device image lacks, into .whl
#
# then through the device tool from the repository root, carry [".whl"], timeout_s 570:
#
#   bash bench/gpu_session.sh            # every stage, in this order
#   bash bench/gpu_session.sh tests      # some stages only (a rerun of what failed)
#
#   model    the random Llama-3-8B-shaped base and 100 adapters; decode at batch 64 against
#            the bandwidth floor (eager and CUDA graphs), an adapter's host-to-slot load while
#            others decode, 256 requests served with 100 adapters (over every slot, then over
#            a quarter of them) and with none, peft's mixed-batch generate on the first 32 of
#            them (cut at 360 s; peft's generate cut 20 s before, so its ratio is still saved)
#   tests    tests/test_gpu.py: the engine through kernels and CUDA graphs against the plain
#            ops, the NF4 kernel against bitsandbytes, the KV pool sized from the GPU (120 s;
#            before kernels: a model stage run to its cap leaves it its whole 120 s)
#   kernels  each Triton kernel and the NF4 matmul alone against the op it replaces (60 s)
#   tune     the kernels' tiles, split and warps swept, in whatever time is left
#
# $OUT gets session.log and a JSON file per benchmark stage, written as each of its sections
# ends: a stage cut at its limit keeps what it measured. TINY=1 runs the same stages on the
# CPU with the benchmark's --tiny shapes and no wheels (tests/test_bench.py does).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
budget=${BUDGET:-540}
out=${OUT:-/tmp/gpu-session}

if [ "${1:-}" = wheels ]; then  # here, not on the device: what the image lacks (gpu_notes.md)
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2 pydantic==2.14.3 \
        pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
        typing-extensions==4.16.0
fi
export PYTHONUNBUFFERED=1
tiny=()
if [ -n "${TINY:-}" ]; then
    tiny=(--tiny)
else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi

# The random base (16 GB) and adapters (8.4 GB) in memory when /dev/shm has the room: the
# disk's write-back would be the slowest part of the setup. WORKDIR overrides.
workdir=.loraplex/bench-gpu
shm_gb=$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)
[ "${shm_gb:-0}" -ge 40 ] && workdir=/dev/shm/loraplex-bench-gpu
workdir=${WORKDIR:-$workdir}

# limit CAP: CAP seconds, or what is left of the budget if less
limit() {
    local left=$((budget - (SECONDS - start)))
    echo $((left < $1 ? left : $1))
}

failed=()

# run NAME CAP COMMAND...: one stage, cut at its limit; a failed stage does not stop the rest
run() {
    local name=$1 seconds
    seconds=$(limit "$2")
    shift 2
    if [ "$seconds" -lt 20 ]; then
        echo "== $name: skipped, ${seconds} s of the budget left"
        return
    fi
    echo "== $name (at most $seconds s, $((SECONDS - start)) s into the session)"
    # STAGE_SECONDS: the cap, for a stage that can cut its own slowest part (peft's generate)
    STAGE_SECONDS=$seconds timeout -k 10 "$seconds" "$@" 2>&1 |
        grep --line-buffered -v -e "it/s]" -e "^Loading"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - start)) s"
    [ "$status" -eq 0 ] || failed+=("$name")
}

bench=(python3 bench/gpu_throughput.py --workdir "$workdir" "${tiny[@]}")

session() {
    [ -n "${TINY:-}" ] ||
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    python3 -c "import importlib, importlib.metadata as m; print(*(f'{p} {m.version(p)}' for p
in ('torch', 'triton', 'bitsandbytes', 'transformers', 'peft', 'pydantic')
if importlib.import_module(p)), sep=', ')" || return 1
    for stage in "$@"; do
        stage "$stage" || return 2
    done
    echo "== session: $((SECONDS - start)) s of $budget; failed: ${failed[*]:-none}"
    [ ${#failed[@]} -eq 0 ]
}

stage() {
    case $1 in
    model)
        run model 360 "${bench[@]}" --sections decode,load,serve,peft --cuda-graphs \
            --out "$out/model.json"
        ;;
    kernels)
        run kernels 60 "${bench[@]}" --sections kernels,matmul --out "$out/kernels.json"
        ;;
    tests)
        run tests 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py
        ;;
    tune)
        run tune 600 "${bench[@]}" --sections tune --out "$out/tune.json"
        ;;
    *)
        echo "unknown stage $1: model, tests, kernels or tune (or 'wheels', here)"
        return 1
        ;;
    esac
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(model tests kernels tune)
mkdir -p "$out"
session "${stages[@]}" 2>&1 | tee "$out/session.log"
