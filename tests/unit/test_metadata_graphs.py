"""The metadata builder's CUDA-graph contract for pure-decode batches (Triton kernels):
the decode table lives at the same addresses every step, padded requests (no query) get
entries that only touch padding rows, and the split count depends only on the batch size
and max_model_len.  Builds vLLM's real engine config and CommonAttentionMetadata (CPU)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.unit

MAX_LEN = 4096


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    import os

    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    import mesa_vllm
    from mesa_vllm.attention.metadata import MesaMetadataBuilder
    from mesa_vllm.testing.tiny_models import make_random_model

    model = make_random_model("llama", tmp_path_factory.mktemp("m") / "llama", train_len=64)
    mesa_vllm.register()
    cfg = EngineArgs(
        model=str(model),
        dtype="float32",
        attention_backend="mesa",
        max_model_len=MAX_LEN,
        max_num_seqs=8,
        additional_config={"mesa": {"first_chunk": 8, "last_chunk": 24, "stair_width": 4}},
    ).create_engine_config()
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32)
    old = os.environ.get("MESA_VLLM_KERNEL")
    os.environ["MESA_VLLM_KERNEL"] = "triton"
    try:
        with set_current_vllm_config(cfg):
            yield MesaMetadataBuilder(spec, ["layer.0"], cfg, torch.device("cpu"))
    finally:
        os.environ.pop("MESA_VLLM_KERNEL")
        if old is not None:
            os.environ["MESA_VLLM_KERNEL"] = old


def _decode_batch(seq_lens: list[int], prompt_lens: list[int], n_padded: int):
    """Single-token decodes for len(seq_lens) requests plus n_padded padding requests,
    laid out the way vLLM pads a FULL CUDA-graph batch (q_len 0, seq_len 0, null rows)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    n = len(seq_lens)
    B = n + n_padded
    qsl = torch.tensor(list(range(n + 1)) + [n] * n_padded, dtype=torch.int32)
    sl = torch.tensor(seq_lens + [0] * n_padded, dtype=torch.int32)
    bt = torch.zeros(B, MAX_LEN // 16, dtype=torch.int32)
    bt[:n] = torch.arange(1, 1 + MAX_LEN // 16)
    return CommonAttentionMetadata(
        query_start_loc=qsl,
        query_start_loc_cpu=qsl,
        seq_lens=sl,
        num_reqs=B,
        num_actual_tokens=B,
        max_query_len=1,
        max_seq_len=max(seq_lens),
        block_table_tensor=bt,
        slot_mapping=torch.zeros(B, dtype=torch.int64),
        seq_lens_cpu_upper_bound=sl,
        rswa_prefix_lens=torch.tensor(prompt_lens + [0] * n_padded, dtype=torch.int32),
    )


def test_pure_decode_table_is_persistent_and_padded(builder):
    from mesa_vllm.ops.triton.table import decode_num_splits

    md1 = builder.build(0, _decode_batch([100, 3000], [90, 2990], n_padded=2))
    t1 = md1.decode_table
    assert md1.prefill_table is None and t1.num_segments == 4
    assert t1.q_lo.tolist() == [0, 1, 2, 3]  # padding requests write padding rows 2, 3
    assert t1.q_abs.tolist() == [99, 2999, 0, 0]  # ... and read a single key
    assert t1.req.tolist() == [0, 1, 2, 3]
    assert md1.num_splits == decode_num_splits(MAX_LEN, 4, builder.num_kv_heads)
    ptrs = [getattr(t1, n).data_ptr() for n in ("q_lo", "q_abs", "kind", "anchor", "req")]

    md2 = builder.build(0, _decode_batch([7, 65, 400], [7, 60, 300], n_padded=1))
    t2 = md2.decode_table
    assert [getattr(t2, n).data_ptr() for n in ("q_lo", "q_abs", "kind", "anchor", "req")] == ptrs
    assert t2.q_abs.tolist() == [6, 64, 399, 0]
    assert t2.kind.tolist()[:2] == [0, 2]  # 7 tokens: causal; 65 > L = 64: stair
    assert md2.num_splits == md1.num_splits  # same batch size, same grid


def test_mixed_batch_keeps_per_step_tables(builder):
    """Prefill + decode (never a FULL graph): tables are fresh, splits follow the lengths."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    qsl = torch.tensor([0, 1, 41], dtype=torch.int32)
    sl = torch.tensor([500, 40], dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl,
        query_start_loc_cpu=qsl,
        seq_lens=sl,
        num_reqs=2,
        num_actual_tokens=41,
        max_query_len=40,
        max_seq_len=500,
        block_table_tensor=torch.arange(2 * 256, dtype=torch.int32).view(2, 256),
        slot_mapping=torch.zeros(41, dtype=torch.int64),
        seq_lens_cpu_upper_bound=sl,
        rswa_prefix_lens=torch.tensor([450, 40], dtype=torch.int32),
    )
    md = builder.build(0, cm)
    assert md.prefill_table is not None and md.decode_table.q_abs.tolist() == [499]
