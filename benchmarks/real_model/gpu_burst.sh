#!/usr/bin/env bash
# The real model (SmolLM2-135M-Instruct, L = 8192) on the H200, after the vLLM bundle and the
# model pieces are staged (../shared/gpu/README.md: /tmp/site, /tmp/models).  Each part fits
# one `run` call (< 10 min); full logs and results land in $OUT.
#
#   bash benchmarks/real_model/gpu_burst.sh check            convert + Mesa vs FLASH_ATTN check
#   bash benchmarks/real_model/gpu_burst.sh check-eval NAME METHODS [eval args...]
#       both at once (the check's engines take a fixed KV cache, so they can start beside
#       the evaluation's servers)
#   bash benchmarks/real_model/gpu_burst.sh toy-eval NAME METHODS [eval args...]
#       the eval beside a passkey run of the bundled 256-token toy models (passkey-llama,
#       passkey-qwen2) at 1x..32x L, TOY_METHODS (default mesa with the models' Mesa
#       settings, E = 64, next to mesa@stair_width=auto), results in NAME/toy-<model>/
#   bash benchmarks/real_model/gpu_burst.sh eval NAME METHODS [eval args...]
#       convert + one `mesa-vllm eval passkey,needle,ppl` run of METHODS (comma list) at
#       1x..16x L, every method's server once for the three tasks, several servers at once;
#       results packed in $OUT/NAME.tgz (NAME/<task>/results.json, table.md, plots).
#       EVAL_SECONDS bounds it: each method's finished tasks are saved as it finishes them
#       (NAME/<task>/partial/; `mesa-vllm eval report DIR` rebuilds tables from them), and
#       the tables of the methods finished by then are written.  Keep EVAL_SECONDS + 90 under
#       the call's limit.  TASKS (default passkey,needle,ppl) picks the tasks; SERVER_ARGS
#       (default --enforce-eager) go to every server.  Perplexity windows share their ends
#       (--ppl-shared-end): text i of every length scores the same last 256 tokens.
#   bash benchmarks/real_model/gpu_burst.sh load
#       convert + benchmarks/serve_load.py: `vllm bench serve` under load, FLASH_ATTN then
#       Mesa (one server each, CUDA graphs on), max-model-len 65536, output 256, concurrency
#       LOAD_CONC (default 1,8,32,64), inputs LOAD_INPUTS in priority order (default
#       1024,32768,8192); its budget ends LOAD_END s (default 530) after this script began,
#       so the table of what finished is written inside a 560 s call.  LOAD_SERVER_ARGS
#       (default --max-num-seqs 64: fewer CUDA graphs to capture; --jit-monitor-verbose: vLLM
#       logs every kernel compiled after start-up, which the table counts per point) go to
#       both servers.  LOAD_MODEL=llama2-7b-shape loads the Llama-2-7B shape with dummy
#       weights instead (LOAD_MAX_LEN sets max-model-len, default 65536).
#       Results packed in $OUT/load.tgz (load/table.md, serve_load.png, raw/*.json, logs).
#   bash benchmarks/real_model/gpu_burst.sh profile-load
#       convert + benchmarks/profile_decode.py on the real model (PROFILE_BATCH, default 8,
#       sequences of PROFILE_LENGTH, default 1024, tokens; Mesa then FLASH_ATTN, in-process,
#       CUDA graphs on: ms per decode step against the kernels' GPU time per step, top ops
#       by GPU and CPU time), then the load part in the time left (LOAD_INPUTS default
#       1024 here).  Results packed in $OUT/profile-load.tgz (profile/, load/).
#   bash benchmarks/real_model/gpu_burst.sh prefix
#       convert + benchmarks/prefix_cache_ttft.py: TTFT of 8 questions sent one at
#       a time on one long document (the pydoc corpus as --text when present, else random
#       token ids), documents PREFIX_DOCS (default 32768,131072) tokens, max-model-len 139264
#       (17 L), one server after the other for PREFIX_CONFIGS (default FLASH_ATTN+cache,mesa
#       fixed+cache,mesa fixed,mesa dynamic; the budget is shared among them): cold and warm
#       TTFT, prefix-cache hits from /metrics, greedy tokens of mesa fixed+cache against mesa
#       fixed.  Its budget ends PREFIX_END s (default 540) after this script began;
#       PREFIX_SERVER_ARGS (default --max-num-seqs 8: the questions come one at a time, fewer
#       CUDA graphs to capture) go to every server, PREFIX_MESA_CONFIG (JSON, e.g.
#       '{"middle_chunk": 1024}') to every Mesa server; PREFIX_CONCURRENT=1 sends questions
#       2..8 at once, after question 1 (--concurrent); PREFIX_MODEL=llama2-7b-shape runs
#       the Llama-2-7B shape with dummy weights on random token ids instead.
#       Results packed in $OUT/prefix.tgz (prefix/table.md, points.json, servers/*.log).
#   bash benchmarks/real_model/gpu_burst.sh soak
#       convert + benchmarks/soak.py: `mesa-vllm serve` with Mesa, CUDA graphs
#       on, max-model-len 65536 (8 L), SOAK_CLIENTS (default 64) clients for SOAK_SECONDS
#       (default 300) loaded seconds, prompts 100 tokens .. 8 L, faults (200 dropped
#       streams, a request at exactly max-model-len, a burst, SIGTERM + restart), then every
#       completed greedy request run alone.  KV cache 1536 MiB: SmolLM2 keeps 30 layers x 3
#       KV heads x 64 dims x 2 (K, V) x 2 bytes = 23040 B per token, so 1 GiB (46603 tokens)
#       could not hold one 65536-token request and vLLM would refuse to start; 1.5 GiB holds
#       69905 tokens (4369 blocks), about three average soak requests: preemption is forced.
#       Everything ends SOAK_END s (default 590: run it in a 600 s call) after this script
#       began (the soak shortens its load to fit).  Results packed in $OUT/soak.tgz (soak/soak.json, table.md, logs).
#   bash benchmarks/real_model/gpu_burst.sh warm-eval NAME METHODS [eval args...]
#       the eval beside a 20 s soak of 4 clients with the soak's own server flags (and
#       --gpu-memory-utilization 0.05, which vLLM leaves out of its compile-cache hash): that
#       server's torch.compile and kernel compiles are then cached on this machine, so a
#       `soak` call after it loses less of its budget to the server's start and restart.
#       Give the eval servers a fixed --kv-cache-memory-bytes in SERVER_ARGS (so vLLM does not
#       measure free memory while the soak server starts).
#   bash benchmarks/real_model/gpu_burst.sh decode-bench
#       benchmarks/bench_decode_batch.py with DECODE_BENCH_ARGS (default: the 7B shape at
#       32k and 128k, batch 1 and 8, --kv-dtype fp8 --tunings fp8_f16_dot=0), no model
#       needed; results in $OUT/decode-bench.tgz (decode_batch.json / .md).
#
# Real text for perplexity: .gpu/corpus/pydoc.txt.xz (carried; made here by
# `python -m mesa_vllm.eval corpus pydoc` and xz).  The OpenAI server needs jmespath, which
# the bundle lacks: carry its wheel in .whl (`pip download --no-deps -d .whl jmespath`).
set -uo pipefail
export PYTHONPATH=/tmp/site:/tmp/models/pylib PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
WORK=/tmp/burst  # everything is written here and packed into $OUT/<part>.tgz (8 files come back)
GGUF=/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf
T_CALL=$(date +%s)
mkdir -p "$OUT" "$WORK"
pack() { tar -C "$WORK" -czf "$OUT/$1.tgz" . && echo "packed $OUT/$1.tgz"; }
[ -d /tmp/site/vllm ] || { echo "vLLM is not staged in /tmp/site"; exit 3; }
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site \
    --upgrade . >/dev/null 2>&1 || { echo "plugin install failed"; exit 3; }
# wheels the bundle lacks for the OpenAI server (jmespath), carried as .whl when present
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
err=$(python3 -c "import gguf, vllm.entrypoints.openai.api_server" 2>&1 | grep Error | tail -1)
[ -z "$err" ] || { echo "$err (stage the model pieces in order: m3, which carries gguf, last)"; exit 3; }
# servers a killed earlier call left behind still hold GPU memory
pkill -9 -f "[v]llm.entrypoints.openai" 2>/dev/null; pkill -9 -f "[V]LLM::" 2>/dev/null
t0=$(date +%s)
python3 -m mesa_vllm.cli models fetch smollm2 --gguf "$GGUF" > "$WORK/fetch.log" 2>&1 \
    || { echo "model conversion failed"; tail -20 "$WORK/fetch.log"; exit 3; }
MODEL=$(python3 -m mesa_vllm.cli models path smollm2)
echo "model ready at $MODEL in $(( $(date +%s) - t0 )) s"; grep -E "ready|check" "$WORK/fetch.log" | tail -2
CORPUS=/tmp/corpus/pydoc.txt
if [ -f .gpu/corpus/pydoc.txt.xz ] && [ ! -f "$CORPUS" ]; then
    mkdir -p /tmp/corpus && xz -dc .gpu/corpus/pydoc.txt.xz > "$CORPUS"
    cp .gpu/corpus/pydoc.txt.json /tmp/corpus/ 2>/dev/null || true
fi
check() {
    timeout 400 python3 benchmarks/real_model/gpu_check.py "$MODEL" --out "$WORK" \
        > "$WORK/check.log" 2>&1
    echo "check rc=$?"; grep -E "^\||^CHECK|Error" "$WORK/check.log" | tail -14
}
evaluate() {
    name=$1; methods=$2; shift 2
    budget=${EVAL_SECONDS:-500}
    server_args=${SERVER_ARGS:---enforce-eager}
    tasks=${TASKS:-passkey,needle,ppl}
    text=(); [[ $tasks == *ppl* ]] && text=(--text "$CORPUS" --ppl-tail 256 --ppl-shared-end)
    timeout -k 30 "$budget" python3 -m mesa_vllm.cli eval "$tasks" --serve "$MODEL" \
        --methods "$methods" --multiples 1,2,4,8,16 "${text[@]}" \
        --server-args "$server_args" --quiet --out "$WORK/$name" "$@" \
        > "$WORK/$name.log" 2>&1
    echo "eval $name rc=$?"; grep -vE "INFO|DEBUG|WARNING|^\[" "$WORK/$name.log" | tail -80
}
load() {
    left=$(( ${LOAD_END:-530} - ($(date +%s) - T_CALL) ))
    HF_HUB_OFFLINE=1 timeout -k 15 "$left" python3 benchmarks/serve_load.py --model "${LOAD_MODEL:-$MODEL}" \
        --max-model-len "${LOAD_MAX_LEN:-65536}" --input-lens "${LOAD_INPUTS:-1024,32768,8192}" --output-len 256 \
        --concurrency "${LOAD_CONC:-1,8,32,64}" \
        --server-args "${LOAD_SERVER_ARGS:---max-num-seqs 64 --jit-monitor-verbose}" \
        --budget-seconds $(( left - 30 )) --out "$WORK/load" > "$WORK/load.log" 2>&1
    echo "load rc=$? (budget $(( left - 30 )) s)"; grep -E "^\[|^\||skipped|Error" "$WORK/load.log" | tail -90
}
profile() {
    HF_HUB_OFFLINE=1 timeout -k 10 "${PROFILE_SECONDS:-300}" python3 benchmarks/profile_decode.py \
        --model "$MODEL" --length "${PROFILE_LENGTH:-1024}" --batch "${PROFILE_BATCH:-8}" \
        --timeout $(( ${PROFILE_SECONDS:-300} / 2 - 5 )) --out "$WORK/profile" \
        > "$WORK/profile.log" 2>&1
    echo "profile rc=$?"; grep -E "^## " "$WORK/profile.log"
}
prefix() {
    left=$(( ${PREFIX_END:-540} - ($(date +%s) - T_CALL) ))
    text=(); [ -f "$CORPUS" ] && [ -z "${PREFIX_MODEL:-}" ] && text=(--text "$CORPUS")
    DEFAULT_CONFIGS="FLASH_ATTN+cache,mesa fixed+cache,mesa fixed,mesa dynamic"
    HF_HUB_OFFLINE=1 timeout -k 15 "$left" python3 benchmarks/prefix_cache_ttft.py \
        --model "${PREFIX_MODEL:-$MODEL}" --max-model-len 139264 --doc-lens "${PREFIX_DOCS:-32768,131072}" \
        --questions 8 "${text[@]}" --configs "${PREFIX_CONFIGS:-$DEFAULT_CONFIGS}" \
        --server-args="${PREFIX_SERVER_ARGS:---max-num-seqs 8}" \
        --mesa-config "${PREFIX_MESA_CONFIG:-"{}"}" $([ "${PREFIX_CONCURRENT:-0}" = 1 ] && echo --concurrent) --budget-seconds $(( left - 30 )) --out "$WORK/prefix" > "$WORK/prefix.log" 2>&1
    echo "prefix rc=$? (budget $(( left - 30 )) s)"
    grep -E "^\[|^\||^ERROR|Error" "$WORK/prefix.log" | tail -60
}
SOAK_SERVER_ARGS="--kv-cache-memory-bytes 1536M --max-num-seqs 64"
warm_soak() {
    HF_HUB_OFFLINE=1 timeout -k 10 400 python3 benchmarks/soak.py --model "$MODEL" \
        --max-model-len 65536 --clients 4 --duration 20 --max-tokens 8 --drop-streams 8 \
        --burst 8 --no-restart --server-args="$SOAK_SERVER_ARGS --gpu-memory-utilization 0.05" \
        --shutdown-timeout 30 --request-timeout 240 --out "$WORK/warm-soak" \
        > "$WORK/warm-soak.log" 2>&1
    echo "warm soak rc=$?"; grep -E "server up|^SOAK|Error" "$WORK/warm-soak.log" | tail -5
}
decode_bench() {
    local args="--shapes 7b --lengths 32768,131072 --batches 1,8 --kv-dtype fp8"
    args=${DECODE_BENCH_ARGS:-"$args --tunings fp8_f16_dot=0"}
    # shellcheck disable=SC2086  # $args is one string of flags
    OUT="$WORK/decode-bench" timeout -k 10 "${DECODE_BENCH_SECONDS:-200}" python3 \
        benchmarks/bench_decode_batch.py $args > "$WORK/decode-bench.log" 2>&1
    echo "decode-bench rc=$?"; grep -E "^\||Error" "$WORK/decode-bench.log" | tail -20
}
soak() {
    end=$(( T_CALL + ${SOAK_END:-590} ))
    HF_HUB_OFFLINE=1 timeout -k 10 $(( end - $(date +%s) )) python3 benchmarks/soak.py \
        --model "$MODEL" --max-model-len 65536 --clients "${SOAK_CLIENTS:-64}" \
        --duration "${SOAK_SECONDS:-300}" --max-tokens 32 --drop-streams 200 --burst 192 \
        --server-args="$SOAK_SERVER_ARGS" \
        --shutdown-timeout 30 --request-timeout 240 --end-by $(( end - 5 )) --tie-tol 0.25 \
        --out "$WORK/soak" > "$WORK/soak.log" 2>&1
    echo "soak rc=$?"; grep -E "^\||^phase|^SOAK|server up|Problems|Error" "$WORK/soak.log" | tail -40
}
toy() {
    name=$1
    methods=${TOY_METHODS:-mesa,mesa@stair_width=auto}
    settings=$(python3 -c "import json; from mesa_vllm.testing.cases import PASSKEY_MODEL_MESA as m; print(json.dumps(m))")
    for m in passkey-llama passkey-qwen2; do
        timeout -k 30 "${EVAL_SECONDS:-500}" python3 -m mesa_vllm.cli eval passkey \
            --serve "mesa_vllm/assets/models/$m" --methods "$methods" --mesa-config "$settings" \
            --multiples 1,2,4,8,16,32 --samples 20 --parallel-servers 2 --quiet \
            --server-args "--enforce-eager --gpu-memory-utilization 0.05 --kv-cache-memory-bytes 2G" \
            --out "$WORK/$name/toy-$m" > "$WORK/$name-toy-$m.log" 2>&1 &
    done
    wait
    for m in passkey-llama passkey-qwen2; do
        echo "toy $m:"; cat "$WORK/$name/toy-$m/table.md" 2>/dev/null | grep "^|" \
            || tail -5 "$WORK/$name-toy-$m.log"
    done
}
case "${1:-check}" in
check) check; pack check ;;
eval) shift; evaluate "$@"; pack "$1" ;;
check-eval)
    shift; check > "$WORK/check.out" & evaluate "$@"; wait; cat "$WORK/check.out"; pack "$1" ;;
load) load; pack load ;;
prefix) prefix; pack prefix ;;
profile-load) profile; LOAD_INPUTS=${LOAD_INPUTS:-1024} load; pack profile-load ;;
soak) soak; pack soak ;;
warm-eval)
    shift; warm_soak > "$WORK/warm.out" & evaluate "$@"; wait; cat "$WORK/warm.out"; pack "$1" ;;
decode-bench) mkdir -p "$WORK/decode-bench"; decode_bench; pack decode-bench ;;
toy-eval)
    shift; toy "$1" > "$WORK/toy.out" & evaluate "$@"; wait; cat "$WORK/toy.out"; pack "$1" ;;
*) echo "unknown part $1"; exit 2 ;;
esac
