"""The Mesa attention backend: vLLM's AttentionBackend / AttentionImpl for Mesa-Extrapolation.

Keys are cached UNROTATED in a FlashAttention-layout paged cache
``[2, num_blocks, block_size, num_kv_heads, head_size]`` (same bytes per token as stock);
RoPE is applied here, at the positions the plan gives each (query, key) pair.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionType,
    MultipleOf,
)

from mesa_vllm.attention.metadata import (
    FreshPrefill,
    MesaMetadata,
    MesaMetadataBuilder,
    TritonMesaMetadata,
)
from mesa_vllm.attention.middle_fa import (
    MiddlePrefill,
    cos_sin_table,
    flash_attend,
    flash_causal,
    middle_attention,
    varlen_causal_attention,
    vllm_rotary,
)
from mesa_vllm.engine_config import check_kv_cache_dtype
from mesa_vllm.envs import decode_kernel_options
from mesa_vllm.ops.rope import RopeSpec
from mesa_vllm.ops.rope import rotate as rotate_torch
from mesa_vllm.ops.torch_mesa import run_segments
from mesa_vllm.ops.triton.table import DecodeTuning
from mesa_vllm.patches import patch_kernel_warmup

BACKEND_NAME = "CUSTOM"  # see mesa_vllm.patches: MESA is an alias of vLLM's CUSTOM slot
# --kv-cache-dtype values stored in fp8 (vLLM allocates uint8; "fp8" is e4m3 on CUDA), with
# the torch dtype the kernels read them as
FP8_KV_DTYPES = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


class MesaAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    accept_output_buffer: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = [
        "auto", "float16", "bfloat16", *FP8_KV_DTYPES,
    ]  # fmt: skip

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 112, 128, 160, 192, 224, 256]

    @staticmethod
    def get_impl_cls() -> type[MesaAttentionImpl]:
        return MesaAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[MesaMetadataBuilder]:
        return MesaMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return True

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False


class MesaAttentionImpl(AttentionImpl[MesaMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        mesa_rope: RopeSpec | None = None,
    ) -> None:
        unsupported = {
            "alibi_slopes": alibi_slopes,
            "sliding_window": sliding_window,
            "logits_soft_cap": logits_soft_cap,
            "kv_sharing_target_layer_name": kv_sharing_target_layer_name,
        }
        for name, value in unsupported.items():
            if value not in (None, 0):
                raise ValueError(f"Mesa backend does not support {name}={value!r}")
        if kv_cache_dtype not in MesaAttentionBackend.supported_kv_cache_dtypes:
            raise ValueError(f"Mesa backend does not support kv_cache_dtype={kv_cache_dtype!r}")
        self.model_dtype = torch.get_default_dtype()  # vLLM builds the model under its dtype
        self.fp8_dtype = FP8_KV_DTYPES.get(kv_cache_dtype)
        check_kv_cache_dtype(kv_cache_dtype)  # the engine config checked it; workers again
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.rope = mesa_rope
        patch_kernel_warmup()  # the worker's start-up compiles the Triton kernels
        # a bad MESA_VLLM_DECODE_KERNEL stops the engine here
        self.decode_tuning = DecodeTuning(**decode_kernel_options())

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write unrotated key [n, Hkv, D] / value [n, Hkv, D] at slot_mapping [n] (-1 = pad)."""
        if kv_cache.is_cuda:  # vLLM's own kernel: no host sync, skips -1 slots on the device
            from vllm._custom_ops import reshape_and_cache_flash

            reshape_and_cache_flash(
                key,
                value,
                kv_cache[0],
                kv_cache[1],
                slot_mapping,
                self.kv_cache_dtype,
                layer._k_scale,
                layer._v_scale,
            )
            return
        n = slot_mapping.shape[0]
        slots = slot_mapping.to(torch.int64)
        valid = slots >= 0
        if self.fp8_dtype is not None:  # as vLLM's cache op stores fp8: x / scale, rounded
            # (copied as the uint8 the cache is allocated as: torch's CPU copies lack fp8)
            key = (key.float() / layer._k_scale.float()).to(self.fp8_dtype).view(kv_cache.dtype)
            value = (value.float() / layer._v_scale.float()).to(self.fp8_dtype)
            value = value.view(kv_cache.dtype)
        k_flat = kv_cache[0].view(-1, self.num_kv_heads, self.head_size)
        v_flat = kv_cache[1].view(-1, self.num_kv_heads, self.head_size)
        if bool(valid.all()):
            k_flat.index_copy_(0, slots, key[:n].to(k_flat.dtype))
            v_flat.index_copy_(0, slots, value[:n].to(v_flat.dtype))
        else:
            k_flat[slots[valid]] = key[:n][valid].to(k_flat.dtype)
            v_flat[slots[valid]] = value[:n][valid].to(v_flat.dtype)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: MesaMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [n, Hq, D] unrotated; kv_cache [2, blocks, block_size, Hkv, D]; output
        [n, Hq, D] written in place for the first ``num_actual_tokens`` rows."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("Mesa backend: fused output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output.fill_(0)
        if self.rope is None:  # a layer built by vLLM's selector, not by mesa_vllm.models
            raise ValueError(
                "Mesa backend needs the model's RoPE (mesa_rope); load the model through a "
                "Mesa-registered architecture (mesa_vllm.models)"
            )
        if isinstance(attn_metadata, TritonMesaMetadata):
            if attn_metadata.fresh is not None:
                self._forward_fresh(query, key, value, attn_metadata.fresh, output)
            scales = None if self.fp8_dtype is None else (layer._k_scale, layer._v_scale)
            if attn_metadata.middle is not None:
                self._forward_middle(query, kv_cache, attn_metadata.middle, output, scales)
            self._forward_triton(query, kv_cache, attn_metadata, output, scales)
            return output
        run_segments(
            query,
            kv_cache[0].view(-1, self.num_kv_heads, self.head_size),
            kv_cache[1].view(-1, self.num_kv_heads, self.head_size),
            output,
            attn_metadata.segments,
            self.rope,
            self.scale,
        )
        return output

    def warm_up(self, kv_cache: torch.Tensor, md: TritonMesaMetadata) -> torch.Tensor:
        """Run the Triton kernels once on ``md`` (``MesaMetadataBuilder.warmup_metadata``)
        over this layer's cache, with zero queries, so that Triton compiles them before the
        server takes requests.  Returns the output rows [3, Hq, D]."""
        # an fp8 cache is stored as uint8; the queries keep the model dtype
        dtype = kv_cache.dtype if self.fp8_dtype is None else self.model_dtype
        query = torch.zeros(md.num_actual_tokens, self.num_heads, self.head_size,
                            dtype=dtype, device=kv_cache.device)  # fmt: skip
        output = torch.empty_like(query)
        scales = None
        if self.fp8_dtype is not None:
            one = torch.ones(1, dtype=torch.float32, device=kv_cache.device)
            scales = (one, one)
        self._forward_triton(query, kv_cache, md, output, scales)
        return output

    def _forward_triton(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        md: TritonMesaMetadata,
        output: torch.Tensor,
        kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Triton kernels (mesa_vllm/ops/triton/) over the paged cache; kv_scales: the
        layer's (k_scale, v_scale) of an fp8 cache."""
        from mesa_vllm.ops.triton.decode import mesa_decode
        from mesa_vllm.ops.triton.prefill import mesa_prefill

        if not self.rope.is_neox_style:
            raise ValueError("Mesa Triton kernels support neox-style RoPE only")
        inv_freq = self._inv_freq_on(query.device)
        if self.fp8_dtype is not None:  # vLLM allocates it as uint8
            kv_cache = kv_cache.view(self.fp8_dtype)
        args = (query, kv_cache[0], kv_cache[1], md.block_table)
        rd = self.rope.rotary_dim
        if md.prefill_table is not None:
            mesa_prefill(*args, md.prefill_table, inv_freq, self.scale, output, rotary_dim=rd,
                         kv_scales=kv_scales)  # fmt: skip
        if md.decode_table is not None:
            mesa_decode(
                *args,
                md.decode_table,
                inv_freq,
                self.scale,
                output,
                md.num_splits,
                rotary_dim=rd,
                max_seq_len=md.max_seq_len,
                tuning=self.decode_tuning,
                kv_scales=kv_scales,
            )

    def _forward_fresh(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        fresh: FreshPrefill,
        output: torch.Tensor,
    ) -> None:
        """Fresh prompts within L, as the stock backend runs them: vLLM's rotary kernel on
        copies of their q/k (the cache keeps the keys unrotated), then FlashAttention varlen
        causal over the step's own keys."""
        from vllm import _custom_ops as ops

        rows = fresh.rows
        if isinstance(rows, slice):
            q, k, v = query[rows].clone(), key[rows].clone(), value[rows]
            out = output[rows]
        else:
            q, k, v = query[rows], key[rows], value[rows]
            out = None
        cos_sin = self._cos_sin_cache(fresh.max_len, q)
        n = q.shape[0]
        ops.rotary_embedding(
            fresh.positions, q.view(n, -1), k.view(n, -1), self.head_size, cos_sin, True
        )
        cu, n_max = fresh.cu_seqlens, fresh.max_len
        res = flash_causal(q, k, v, cu, n_max, cu, n_max, self.scale, fresh.fa_version, out)
        if out is None:
            output.index_copy_(0, rows, res)

    def _forward_middle(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        mp: MiddlePrefill,
        output: torch.Tensor,
        kv_scales: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        """Middle chunks as one varlen causal call (middle_fa.py): keys gathered from the
        cache; FlashAttention after vLLM's rotary kernel, or (``mp.fa_version`` None,
        MESA_VLLM_MIDDLE_FA=torch) torch's rotation and attention."""
        if self.fp8_dtype is not None:  # vLLM allocates it as uint8
            kv_cache = kv_cache.view(self.fp8_dtype)
        if mp.fa_version is None:
            rope = self.rope
            rotate, attend = (lambda x, p: rotate_torch(x, p, rope)), varlen_causal_attention
        else:
            rotate = vllm_rotary(self._cos_sin_cache(mp.max_k, query), self.head_size)
            attend = flash_attend
        caches = (kv_cache[i].view(-1, self.num_kv_heads, self.head_size) for i in (0, 1))
        res = middle_attention(query, *caches, mp, self.scale, rotate, attend, kv_scales)
        output.index_copy_(0, mp.rows, res.to(output.dtype))

    def _cos_sin_cache(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """[rows >= n, rotary_dim]: cos | sin of position * inv_freq (fp32, then like's dtype),
        built as vLLM's RotaryEmbedding builds its cache."""
        cached = getattr(self, "_cos_sin", None)
        if cached is None or cached.shape[0] < n or cached.dtype != like.dtype:
            rows = max(4096, 1 << (n - 1).bit_length())
            cached = cos_sin_table(self._inv_freq_on(like.device), rows, like.dtype)
            self._cos_sin = cached
        return cached

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        cached = getattr(self, "_inv_freq_dev", None)
        if cached is None or cached.device != device:
            cached = self.rope.inv_freq.to(device=device, dtype=torch.float32)
            self._inv_freq_dev = cached
        return cached
