#!/usr/bin/env bash
# Fixed-N stair emulated per length: E = ceil(T / N), one server per (N, length).
cd "$(dirname "$0")/../.." && source .venv/bin/activate && mkdir -p "${OUT:-out/fixed_n}"
for N in 32 128; do
  for M in 2 4 8 16 32; do
    T=$((256 * M)); E=$(( (T + N - 1) / N ))
    mesa-vllm eval passkey --serve mesa_vllm/assets/models/passkey-llama --methods mesa \
      --multiples $M --samples 20 \
      --mesa-config "{\"first_chunk\":32,\"last_chunk\":64,\"max_remainder\":32,\"stair_width\":$E}" \
      --out ${OUT:-out/fixed_n}/N$N-M$M > ${OUT:-out/fixed_n}/N$N-M$M.log 2>&1
    echo "N=$N M=$M E=$E $(grep -E '^\| [0-9]' ${OUT:-out/fixed_n}/N$N-M$M/table.md | tail -1)"
  done
done
