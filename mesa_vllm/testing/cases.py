"""Shared test cases: Mesa settings for the 64-token random test models, and one explicit
configuration per weave-PE variant (docs/VARIANTS.md).  Used by the CPU test suite and by the
GPU scripts in benchmarks/ (which have no pytest)."""

from __future__ import annotations

# Llama-3.1 rope scaling, shrunk so its frequency bands matter for short test sequences
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

TRAIN_LEN = 64
# Mesa parameters scaled to a 64-token model (the paper's are for 4k models).
MESA_SMALL = {
    "train_len": TRAIN_LEN,
    "first_chunk": 8,
    "last_chunk": 24,
    "max_remainder": 10,
    "stair_width": 4,
}

# every variant field explicit: the dense oracle resolves no defaults
VARIANT_CASES = {
    "rerope": dict(pe="rerope", chunked_prefill=False, window=24, log_n_scaling=True),
    "leaky_rerope": dict(
        pe="leaky_rerope", chunked_prefill=False, window=24, leaky_factor=22.5, log_n_scaling=True
    ),
    "self_extend": dict(
        pe="self_extend", chunked_prefill=False, window=16, group_size=20, log_n_scaling=False
    ),
    "streaming": dict(
        pe="streaming", chunked_prefill=False, window=56, sink_tokens=4, log_n_scaling=False
    ),
    "lm_infinite": dict(
        pe="lm_infinite", chunked_prefill=False, window=63, sink_tokens=4, log_n_scaling=False
    ),
    # the paper's ablation: ReRoPE / Leaky-ReRoPE inside Mesa's chunked prefill
    "chunked_rerope": dict(pe="rerope", chunked_prefill=True, window=24, log_n_scaling=True),
    "chunked_leaky": dict(
        pe="leaky_rerope", chunked_prefill=True, window=24, leaky_factor=22.5, log_n_scaling=True
    ),
}

# Mesa settings of the bundled 256-token passkey models (mesa_vllm/assets/models/*/MODEL_CARD.md)
PASSKEY_MODEL_MESA = {"first_chunk": 32, "last_chunk": 64, "max_remainder": 32, "stair_width": 64}
