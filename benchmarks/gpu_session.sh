#!/usr/bin/env bash
# One GPU burst on the H200 machine, after the vLLM bundle is staged (../shared/gpu/README.md):
# installs the plugin next to the bundle, runs the smoke test on both kernel paths (their
# greedy tokens should agree), then the end-to-end benchmark.  Full logs land in $OUT.
#
#   bash benchmarks/gpu_session.sh [lengths]        (default lengths 4096,32768,131072)
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
[ -d /tmp/site/vllm ] || { echo "vLLM is not staged in /tmp/site"; exit 3; }
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site \
    --upgrade . >/dev/null 2>&1 || { echo "plugin install failed"; exit 3; }
for kernel in triton torch; do
    MESA_VLLM_KERNEL=$kernel timeout 240 python3 benchmarks/gpu_smoke.py \
        > "$OUT/smoke-$kernel.log" 2>&1
    echo "smoke $kernel rc=$?"
    grep -E "^SMOKE|Error" "$OUT/smoke-$kernel.log" | tail -8
done
timeout 420 python3 benchmarks/bench_gpu_e2e.py --lengths "${1:-4096,32768,131072}" \
    --out "$OUT" > "$OUT/e2e.log" 2>&1
echo "e2e rc=$?"
grep -v -E "INFO|DEBUG|WARNING|^\(EngineCore" "$OUT/e2e.log" | tail -40
