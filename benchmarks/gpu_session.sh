#!/usr/bin/env bash
# Everything to check and measure on a CUDA machine, in stages, each under its
# own time limit so that one slow stage cannot starve the others.
#
#   bash benchmarks/gpu_session.sh [STAGE ...]     (default: every stage, in this order)
#
# Stages:
#   env      GPU, driver, torch and triton versions
#   tests    the test files with CUDA paths (Triton kernels vs the reference on the GPU)
#   memread  benchmarks/bench_memory_read.py: reference vs chunked torch vs Triton, fwd+bwd
#   scaling  gam bench scaling --device cuda: the paper's Table 2 (batch 16, C 512, fp16
#            autocast, T 256..8192), reference and fast GAM, Transformer naive and SDPA, Mamba
#   train    gam train (cpu preset, WikiText-2) on CUDA in bf16, 300 steps
#   speed    gam bench speed --device cuda: LM training throughput, every row
#   speed64  the same at batch 64 x 256 (a batch that fills the GPU), GAM and Transformer rows
#   paper    gam bench paper --device cuda --preset paper: Table 1 at the paper's scale
#
# Logs and results go under $OUT (default out/gpu). Needs torch with CUDA; triton and
# pytest-xdist optional (without xdist the tests run in one process).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/session.log"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env tests memread scaling train speed speed64 paper)

run() {  # run LIMIT_S CMD...: log, time, and never let one stage kill the script
    local limit=$1; shift
    echo "=== $(date -u +%H:%M:%S) $* (limit ${limit}s)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== rc ${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$LOG"
}

for stage in "${stages[@]}"; do
    case $stage in
        env)
            run 60 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
            run 120 python3 -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name()); import triton; print('triton', triton.__version__)"
            ;;
        tests)
            xdist=(); python3 -c "import xdist" 2>/dev/null && xdist=(-n 4)
            run 240 python3 -m pytest -q -p no:cacheprovider "${xdist[@]}" -k "cuda or triton" tests/
            ;;
        memread)
            run 200 python3 benchmarks/bench_memory_read.py --device cuda --triton-variants
            ;;
        scaling)
            run 330 python3 -m gam.cli bench scaling --device cuda --out "$OUT/scaling-cuda" \
                --models gam,gam_fast,transformer_sdpa,transformer_naive,mamba --time-budget 60
            ;;
        train)
            run 240 python3 -m gam.cli train --device cuda --precision bf16 --max-steps 300 --out /tmp/gam-run-cuda
            ;;
        speed)
            run 420 python3 -m gam.cli bench speed --device cuda --out "$OUT/bench-speed-cuda"
            ;;
        speed64)
            run 420 python3 -m gam.cli bench speed --device cuda --batch 64 --memory-seq 0 --out "$OUT/bench-speed-cuda-b64" \
                --rows gam_ref_fp32,gam_fast_fp32,gam_ref_bf16,gam_fast_bf16,gam_fast_compiled_fp32,gam_fast_compiled_bf16,transformer_fp32,transformer_bf16,transformer_compiled_bf16
            ;;
        paper)
            run 600 python3 -m gam.cli bench paper --device cuda --preset paper --out "$OUT/paper-cuda"
            ;;
        *)
            echo "unknown stage $stage" | tee -a "$LOG"
            ;;
    esac
done
