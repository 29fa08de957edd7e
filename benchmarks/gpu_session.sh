#!/usr/bin/env bash
# GPU bursts on the H200 machines, after the vLLM bundle is staged (../shared/gpu/README.md).
# Each part fits one `run` call (< 10 min); full logs land in $OUT.
#
#   bash benchmarks/gpu_session.sh smoke        smoke test (Triton path) + correctness + passkey
#   bash benchmarks/gpu_session.sh tp2          TP=2 vs TP=1 (needs nvidia-h200-x2)
#   bash benchmarks/gpu_session.sh speed BACKEND [lengths]   7B-shape speed of one backend
#   bash benchmarks/gpu_session.sh graphs       smoke eager-vs-graphs + Mesa speed + correctness
#   bash benchmarks/gpu_session.sh variants     each weave-PE variant served on the GPU
#   bash benchmarks/gpu_session.sh kernels      kernel checks + sweeps + speed vs FA3, and the
#                                               7B GEMM floor of prefill (prefill_floor.py)
#   bash benchmarks/gpu_session.sh decode       kernel checks + decode sweep + speed vs FA3;
#                                               the picked MESA_VLLM_DECODE_KERNEL value goes
#                                               to /tmp/decode_env (for the engine parts)
#   bash benchmarks/gpu_session.sh defaults     kernel checks + speed vs FA3 at the launcher's
#                                               defaults (no sweep)
#   bash benchmarks/gpu_session.sh check        smoke eager-vs-graphs + correctness vs FLASH_ATTN
#   bash benchmarks/gpu_session.sh recheck      after a kernel change: the kernel variants a
#                                               serving engine compiles (jit_variants.py),
#                                               the kernel checks of Mesa and of the weave
#                                               variants vs the dense reference, and decode
#                                               at batch 1..64 vs FA3 (bench_decode_batch.py)
#   bash benchmarks/gpu_session.sh fp8 [backends] [lengths]   the speed part with an fp8 KV
#                                               cache (FLASH_ATTN,mesa; 32k and 128k): decode
#                                               ms/token and KV blocks, next to `speed mesa`
#   bash benchmarks/gpu_session.sh fp8-all      the fp8 kernel checks and the fp8 part
#                                               in one call (at most 9.5 min)
#   bash benchmarks/gpu_session.sh middle-fa    MESA_VLLM_MIDDLE_FA: middle chunks through
#                                               FlashAttention against the dense reference
#                                               and the Triton kernel, per-layer time before
#                                               and after (benchmarks/middle_fa.py), then the
#                                               7B-shape engine prefill at 32k and 128k:
#                                               FLASH_ATTN and Mesa with the switch on, then
#                                               Mesa with it off (bench_gpu_e2e.py --parts
#                                               speed); at most 9.5 min
#   (speed takes a comma list of backends: each runs in its own process, same call)
#
# If .gpu/snap exists (a `git archive` of the committed mesa_vllm/), it replaces the working
# copy first, so a burst runs the committed code even while files are being edited.
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
[ -d /tmp/site/vllm ] || { echo "vLLM is not staged in /tmp/site"; exit 3; }
[ -d .gpu/snap/mesa_vllm ] && cp -r .gpu/snap/mesa_vllm/. mesa_vllm/
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site \
    --upgrade . >/dev/null 2>&1 || { echo "plugin install failed"; exit 3; }
short() { grep -v -E "INFO|DEBUG|WARNING|^\(EngineCore.*(INFO|WARNING)" "$1" | tail -${2:-30}; }
case "${1:-smoke}" in
smoke)
    MESA_VLLM_KERNEL=triton timeout 200 python3 benchmarks/gpu_smoke.py > "$OUT/smoke.log" 2>&1
    echo "smoke rc=$?"; grep -E "^SMOKE|Error" "$OUT/smoke.log" | tail -8
    timeout 360 python3 benchmarks/bench_gpu_e2e.py --parts correctness,passkey --out "$OUT" \
        > "$OUT/e2e.log" 2>&1
    echo "e2e rc=$?"; short "$OUT/e2e.log" 30 ;;
tp2)
    timeout 560 python3 benchmarks/gpu_tp2.py --out "$OUT" > "$OUT/tp2.log" 2>&1
    echo "tp2 rc=$?"; short "$OUT/tp2.log" 30 ;;
speed)
    timeout 570 python3 benchmarks/bench_gpu_e2e.py --parts speed --backends "$2" \
        --lengths "${3:-4096,32768,131072}" --speed-timeout 560 --out "$OUT" \
        > "$OUT/speed-$2.log" 2>&1
    echo "speed rc=$?"; short "$OUT/speed-$2.log" 25 ;;
fp8)  # fp8 KV cache: FLASH_ATTN and Mesa, 7B shape, 32k and 128k (Mesa bf16: the speed part)
    mkdir -p "$OUT/fp8"
    BENCH_KV_DTYPE=fp8 timeout 570 python3 benchmarks/bench_gpu_e2e.py --parts speed \
        --backends "${2:-FLASH_ATTN,mesa}" --lengths "${3:-32768,131072}" --speed-timeout 280 \
        --out "$OUT/fp8" > "$OUT/fp8/speed.log" 2>&1
    echo "fp8 speed rc=$?"; short "$OUT/fp8/speed.log" 25 ;;
fp8-all)  # one call for the fp8 KV cache: the kernel checks (their fp8 rows; a cold machine
    # compiles for ~2 min), then FLASH_ATTN and Mesa with an fp8 cache, 7B shape, 32k and 128k
    # (each engine may take ~3 min to start cold; Mesa bf16 for comparison: `speed mesa`)
    timeout 150 python3 benchmarks/bench_kernels.py --skip-speed ${SEED:+--seed $SEED} \
        > "$OUT/kernels.log" 2>&1
    echo "kernels rc=$?"; grep -E "^\| |checks done|seed|Error" "$OUT/kernels.log" | tail -16
    mkdir -p "$OUT/fp8"
    BENCH_KV_DTYPE=fp8 timeout 420 python3 benchmarks/bench_gpu_e2e.py --parts speed \
        --backends FLASH_ATTN,mesa --lengths 32768,131072 --speed-timeout 205 \
        --out "$OUT/fp8" > "$OUT/fp8/speed.log" 2>&1
    echo "fp8 speed rc=$?"; short "$OUT/fp8/speed.log" 12 ;;
graphs)  # CUDA-graph decode: smoke eager vs graphs, Mesa speed, correctness vs FLASH_ATTN
    timeout 170 python3 benchmarks/gpu_smoke.py > "$OUT/smoke.log" 2>&1
    echo "smoke rc=$?"; grep -E "^SMOKE|Error" "$OUT/smoke.log" | tail -8
    timeout 210 python3 benchmarks/bench_gpu_e2e.py --parts speed --backends mesa \
        --speed-timeout 200 --out "$OUT" > "$OUT/speed-mesa.log" 2>&1
    echo "speed rc=$?"; grep -E "^\[mesa\]" "$OUT/speed-mesa.log"
    timeout 150 python3 benchmarks/bench_gpu_e2e.py --parts correctness --out "$OUT" \
        > "$OUT/correctness.log" 2>&1
    echo "correctness rc=$?"; grep -E "greedy_equal|Error" "$OUT/correctness.log" | tail -4 ;;
middle-fa)
    timeout 150 python3 benchmarks/middle_fa.py --out "$OUT" > "$OUT/middle_fa.log" 2>&1
    echo "middle_fa rc=$?"; grep -E "^\||Error|^20" "$OUT/middle_fa.log" | tail -30
    # after: Mesa (it pays the compile) and FLASH_ATTN with the switch on, in one run;
    # before: Mesa with it off
    lens=${2:-32768,131072}
    mkdir -p "$OUT/middle-fa-1" "$OUT/middle-fa-0"
    MESA_VLLM_MIDDLE_FA=1 timeout 260 python3 benchmarks/bench_gpu_e2e.py --parts speed \
        --backends mesa,FLASH_ATTN --lengths "$lens" --speed-timeout 190 \
        --out "$OUT/middle-fa-1" > "$OUT/middle-fa-1/speed.log" 2>&1
    echo "engine speed, Mesa and FLASH_ATTN with MESA_VLLM_MIDDLE_FA=1: rc=$?"
    short "$OUT/middle-fa-1/speed.log" 8
    MESA_VLLM_MIDDLE_FA=0 timeout 100 python3 benchmarks/bench_gpu_e2e.py --parts speed \
        --backends mesa --lengths "$lens" --speed-timeout 90 \
        --out "$OUT/middle-fa-0" > "$OUT/middle-fa-0/speed.log" 2>&1
    echo "engine speed, Mesa with MESA_VLLM_MIDDLE_FA=0: rc=$?"
    short "$OUT/middle-fa-0/speed.log" 8 ;;
variants)
    timeout 560 python3 benchmarks/gpu_variants.py --out "$OUT" > "$OUT/variants.log" 2>&1
    echo "variants rc=$?"; short "$OUT/variants.log" 30 ;;
kernels)
    timeout 420 python3 benchmarks/bench_kernels.py > "$OUT/kernels.log" 2>&1
    echo "kernels rc=$?"; grep -E "^\| |checks done|config" "$OUT/kernels.log" | tail -60
    timeout 120 python3 benchmarks/prefill_floor.py --out "$OUT" > "$OUT/floor.log" 2>&1
    echo "floor rc=$?"; tail -8 "$OUT/floor.log" ;;
decode)  # kernel checks + decode sweep + speed vs FA3, no prefill sweep or floor
    timeout 560 python3 benchmarks/bench_kernels.py --sweep-len 0 \
        --decode-env-out /tmp/decode_env > "$OUT/kernels.log" 2>&1
    echo "kernels rc=$?"; grep -E "^\| |checks done|config|DECODE_ENV" "$OUT/kernels.log" | tail -90 ;;
defaults)  # kernel checks + speed vs FA3 of the defaults, as the engine launches them
    timeout 400 python3 benchmarks/bench_kernels.py --skip-sweep --sweep-len 0 \
        > "$OUT/kernels.log" 2>&1
    echo "kernels rc=$?"; grep -E "^\| |checks done|config|DECODE_ENV" "$OUT/kernels.log" | tail -40 ;;
check)
    timeout 300 python3 benchmarks/gpu_smoke.py > "$OUT/smoke.log" 2>&1
    echo "smoke rc=$?"; grep -E "^SMOKE|Error" "$OUT/smoke.log" | tail -8
    timeout 280 python3 benchmarks/bench_gpu_e2e.py --parts correctness --out "$OUT" \
        > "$OUT/correctness.log" 2>&1
    echo "correctness rc=$?"; short "$OUT/correctness.log" 20 ;;
recheck)
    timeout 110 python3 benchmarks/jit_variants.py > "$OUT/jit.log" 2>&1
    echo "jit rc=$?"; grep -E "^\||seed|Error" "$OUT/jit.log" | tail -6
    timeout 170 python3 benchmarks/bench_kernels.py --skip-speed ${SEED:+--seed $SEED} \
        > "$OUT/kernels.log" 2>&1
    echo "kernels rc=$?"; grep -E "^\| |checks done|seed|Error" "$OUT/kernels.log" | tail -14
    timeout 140 python3 benchmarks/bench_kernels.py --variants --skip-speed \
        ${SEED:+--seed $SEED} > "$OUT/variants.log" 2>&1
    echo "variants rc=$?"; grep -E "^\| |checks done|seed|Error" "$OUT/variants.log" | tail -24
    timeout 130 python3 benchmarks/bench_decode_batch.py > "$OUT/decode_batch.log" 2>&1
    echo "decode batch rc=$?"; grep -E "^\||Error" "$OUT/decode_batch.log" | tail -20 ;;
*) echo "unknown part $1"; exit 2 ;;
esac
