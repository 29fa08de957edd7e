"""The dense Mesa reference against hand-computed cases and transformers' own RoPE."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

from mesa_vllm.testing.cases import LLAMA3_ROPE
from mesa_vllm.testing.reference import (
    mesa_attention_reference,
    query_scales,
    reference_positions,
    reference_split,
    rope_angles,
    rope_inv_freq,
)

pytestmark = pytest.mark.unit

# A small long-prompt setting used throughout: L=64, F=4, Lc=16, Mmax=8, E=10.
# T=230: X = 210, Nq = 3, M = 30 >= 8 -> C = 210 // 4 = 52, 4 middle chunks at 4, 56, 108,
# 160; last chunk [212, 230); last-chunk anchor A = 230 - (229 mod 52) = 209.
SMALL = dict(L=64, F=4, Lc=16, Mmax=8, E=10)
LLAMA3 = LLAMA3_ROPE
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
DEFAULT = {"rope_type": "default", "rope_theta": 10000.0}


def rand_qkv(S: int, Hq: int = 4, Hkv: int = 2, D: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, Hq, D, generator=g) * 2
    k = torch.randn(S, Hkv, D, generator=g) * 2
    v = torch.randn(S, Hkv, D, generator=g)
    return q, k, v


def hf_config(rp: dict, Hq: int, Hkv: int, D: int, L: int = 64) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hkv, head_dim=D,
        max_position_embeddings=L, rope_parameters=dict(rp),
    )  # fmt: skip


def hf_cos_sin(rp: dict, positions: list[int], Hq: int, Hkv: int, D: int):
    """transformers' cos/sin, [len(positions), D], via LlamaRotaryEmbedding (float32)."""
    rope = LlamaRotaryEmbedding(hf_config(rp, Hq, Hkv, D))
    pos = torch.tensor([positions])
    cos, sin = rope(torch.zeros(1, dtype=torch.float32), pos)
    return cos[0], sin[0]


def hf_causal(q, k, v, rp: dict):
    """Plain causal RoPE attention with transformers' rotary + torch SDPA.  [S, H, D]."""
    S, Hq, D = q.shape
    Hkv = k.shape[1]
    cos, sin = hf_cos_sin(rp, list(range(S)), Hq, Hkv, D)
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, S, D]
    qr, kr = apply_rotary_pos_emb(qt, kt, cos[None], sin[None])
    kr = kr.repeat_interleave(Hq // Hkv, dim=1)
    vt = vt.repeat_interleave(Hq // Hkv, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(qr, kr, vt, is_causal=True)
    return out[0].transpose(0, 1)


def explicit_row(q, k, v, p: int, keys: list[int], kpos: list[int], qpos: int, qscale: float):
    """Output [Hq, D] of query p over ``keys`` at positions ``kpos``, one key at a time,
    with transformers' rotary (default theta 10000)."""
    Hq, D = q.shape[1:]
    Hkv = k.shape[1]
    cq, sq = hf_cos_sin(DEFAULT, [qpos], Hq, Hkv, D)
    ck, sk = hf_cos_sin(DEFAULT, kpos, Hq, Hkv, D)
    qr, _ = apply_rotary_pos_emb(q[p][None], q[p][None], cq, sq, unsqueeze_dim=1)  # [1,Hq,D]
    kk = k[keys]  # [K, Hkv, D]
    _, kr = apply_rotary_pos_emb(kk, kk, ck, sk, unsqueeze_dim=1)
    G = Hq // Hkv
    out = torch.empty(Hq, D)
    for h in range(Hq):
        scores = (kr[:, h // G] @ (qr[0, h] * qscale)) / math.sqrt(D)
        out[h] = torch.softmax(scores, 0) @ v[keys, h // G]
    return out


# ---------------------------------------------------------------- (a) paper Figure 1


@pytest.mark.parametrize("T_prompt,L,F", [(6, 6, 1), (10, 6, 1)])
def test_figure1_stair(T_prompt, L, F):
    # Query 9 sees keys 0..9 at relative positions 6 6 5 5 4 4 3 2 1 0 with E = 2.
    # n = 10, C = L - F = 5: A = 10 - (9 mod 5) = 6, pos(j < 6) = 5 - (5 - j) // 2.
    # (6, 6, 1): short prompt that grew past L (C = L - F); (10, 6, 1): long prompt with
    # X = 10 - 512 - 1 <= 0, so no middle chunk, C = L - F and the last chunk is [1, 10).
    mask, qpos, kpos = reference_positions(T_prompt, 10, L, F, 512, 200, 2)
    assert mask[9].all()
    assert kpos[9].tolist() == [3, 3, 4, 4, 5, 5, 6, 7, 8, 9]
    assert int(qpos[9]) == 9
    assert (qpos[9] - kpos[9]).tolist() == [6, 6, 5, 5, 4, 4, 3, 2, 1, 0]
    # query 8 (n = 9 generated or n = 10 prompt): anchor 6 as well
    assert kpos[8, :9].tolist() == [3, 3, 4, 4, 5, 5, 6, 7, 8] and int(qpos[8]) == 8


# ---------------------------------------------------------------- (b) DynamicSplit


@pytest.mark.parametrize(
    "T,Lc,Mmax,expect",
    [
        (64, 16, 8, (60, 0)),  # T <= L: short
        (200, 16, 8, (60, 3)),  # X=180, Nq=3, M=0 < 8: C = L-F, Nq chunks
        (85, 16, 8, (60, 1)),  # X=65, Nq=1, M=5 < 8
        (230, 16, 8, (52, 4)),  # X=210, Nq=3, M=30 >= 8: C = 210 // 4, Nq+1 chunks
        (70, 16, 8, (50, 1)),  # X=50, Nq=0, M=50 >= 8: one chunk of X
        (70, 16, 100, (60, 0)),  # X=50, Nq=0, M=50 < 100: no middle chunk
        (70, 100, 8, (60, 0)),  # X=-34 <= 0
        (84, 80, 8, (60, 0)),  # X=0
    ],
)
def test_dynamic_split(T, Lc, Mmax, expect):
    assert reference_split(T, 64, 4, Lc, Mmax) == expect


def test_chunk_structure_T230():
    T = 230
    mask, qpos, kpos = reference_positions(T, T, **SMALL)
    first = list(range(4))
    assert mask[3].tolist() == [j <= 3 for j in range(T)]  # first chunk causal
    assert kpos[3, :4].tolist() == first and int(qpos[3]) == 3
    # middle chunk 1 is [56, 108): query 100 sees [0, 4) and [56, 100]
    assert mask[100].nonzero().flatten().tolist() == first + list(range(56, 101))
    assert kpos[100, :4].tolist() == first
    assert kpos[100, 56:101].tolist() == list(range(4, 49)) and int(qpos[100]) == 48
    assert mask[56].nonzero().flatten().tolist() == first + [56] and int(qpos[56]) == 4
    # last query of middle chunk 3 = [160, 212)
    assert mask[211].nonzero().flatten().tolist() == first + list(range(160, 212))
    assert int(qpos[211]) == 4 + 51
    # last chunk [212, 230): stair, n = T, A = 209
    for p in (212, 229):
        assert mask[p].nonzero().flatten().tolist() == list(range(p + 1))
        pos = [j if j >= 209 else 208 - (208 - j) // 10 for j in range(p + 1)]
        assert kpos[p, : p + 1].tolist() == pos and int(qpos[p]) == p
    assert int(kpos[229, 0]) == 208 - 20
    # middle-chunk distances never exceed a trained one
    mid = (qpos[:, None] - kpos)[4:212][mask[4:212]]
    assert int(mid.max()) <= 63 and int(mid.min()) == 0


def test_stair_query_below_anchor():
    # The query itself takes a stair position when it lies below the anchor.  T=190, Lc=16,
    # Mmax=100: X=170, Nq=2, M=50 < 100 -> C=60, middle chunks [4,64), [64,124), last chunk
    # [124, 190); A = 190 - 189 mod 60 = 181, so queries 124..180 sit on the stair.
    assert reference_split(190, 64, 4, 16, 100) == (60, 2)
    mask, qpos, kpos = reference_positions(190, 190, 64, 4, 16, 100, 10)
    assert mask[124].nonzero().flatten().tolist() == list(range(125))
    assert int(qpos[123]) == 4 + 59  # last middle query
    assert int(qpos[150]) == 180 - (180 - 150) // 10 == 177
    assert kpos[150, 140].item() == 176 and kpos[150, 0].item() == 162
    assert int(qpos[181]) == 181 and kpos[181, 180].item() == 180


def test_auto_stair_width_keeps_every_row_inside_L():
    """E = "auto": the same worked example as above (T = 190, C = 60, A = 181); with L = 64
    the last chunk's largest span 9 + floor(180 / E) <= 63 needs E = 4 (E = 3: 69).  Every
    stair row, prompt and generated, sees relative positions <= L - 1, and one less E would
    push the row's stair set past it."""
    mask, qpos, kpos = reference_positions(190, 230, 64, 4, 16, 100, "auto")
    assert int(qpos[150]) == 180 - (180 - 150) // 4 and kpos[150, 0].item() == 180 - 45
    assert kpos[189, 0].item() == 180 - 45  # same n = T for every last-chunk query
    for p in range(124, 230):
        rel = qpos[p] - kpos[p, : p + 1]
        assert int(rel.max()) <= 63, p
    # p = 229: n = 230, A = 230 - 229 % 60 = 181 still, n - A = 49: E = floor(180 / 15) + 1
    # = 13, span 49 + 13 = 62 (E = 12: 64)
    assert int(qpos[229] - kpos[229, 0]) == 49 + 180 // 13 <= 63 < 49 + 180 // 12
    fixed = reference_positions(190, 230, 64, 4, 16, 100, 4)
    assert torch.equal(fixed[2][:190], kpos[:190])  # the prompt's E is 4


def test_grown_request_uses_L_minus_F():
    T, S = 50, 80  # short prompt, decoding past L = 64
    mask, qpos, kpos = reference_positions(T, S, **SMALL)
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    assert torch.equal(mask[:64, :64], causal) and not mask[:64, 64:].any()
    assert torch.equal(qpos[:64], torch.arange(64))
    # p = 64: n = 65, C = 60, A = 65 - 64 % 60 = 61
    assert int(qpos[64]) == 64
    assert kpos[64, :65].tolist() == [j if j >= 61 else 60 - (60 - j) // 10 for j in range(65)]
    # p = 79: n = 80, A = 80 - 79 % 60 = 61 still; p = 120 would be A = 121
    assert kpos[79, 0].item() == 60 - 6


def test_short_positions_are_causal_indices():
    mask, qpos, kpos = reference_positions(40, 64, **SMALL)
    assert torch.equal(mask, torch.ones(64, 64, dtype=torch.bool).tril())
    assert torch.equal(qpos, torch.arange(64))
    assert torch.equal(kpos, torch.arange(64).expand(64, 64).tril())


def test_query_scales():
    s = query_scales(230, 262, 64, F=4, Lc=16, Mmax=8)
    assert s[3] == 1 and s[100] == 1 and s[211] == 1  # causal and middle
    assert s[220].item() == pytest.approx(math.log(221) / math.log(64))
    assert s[261].item() == pytest.approx(math.log(262) / math.log(64))
    assert torch.equal(query_scales(230, 262, 64, False, F=4, Lc=16, Mmax=8), torch.ones(262))
    g = query_scales(50, 80, 64, F=4, Lc=16, Mmax=8)  # grown
    assert g[:64].eq(1).all() and g[70].item() == pytest.approx(math.log(71) / math.log(64))


# ---------------------------------------------------------------- (c) short == causal


@pytest.mark.parametrize("rp", [DEFAULT, LLAMA3, LINEAR], ids=["default", "llama3", "linear"])
@pytest.mark.parametrize("T", [64, 30])
def test_short_equals_causal_rope(rp, T):
    q, k, v = rand_qkv(64)
    out = mesa_attention_reference(q, k, v, T, **SMALL, rope_parameters=rp)
    torch.testing.assert_close(out, hf_causal(q, k, v, rp), rtol=1e-5, atol=1e-5)


def test_partial_rotary_matches_phi3_rotary():
    rp = {**DEFAULT, "partial_rotary_factor": 0.5}
    S, Hq, D = 48, 2, 32
    q, k, v = rand_qkv(S, Hq, Hq, D)
    assert rope_inv_freq(D, rp).shape == (D // 4,)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))  # rotary dim 16 of 32
    ang = torch.arange(S)[:, None].float() * inv
    emb = torch.cat((ang, ang), -1)
    qr, kr = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin(), unsqueeze_dim=1)
    scores = torch.einsum("phd,jhd->hpj", qr, kr) / math.sqrt(D)
    scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.einsum("hpj,jhd->phd", torch.softmax(scores, -1), v)
    out = mesa_attention_reference(q, k, v, S, **SMALL, rope_parameters=rp)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- explicit rows


def test_rows_match_explicit_per_key_computation():
    T, S = 230, 262
    q, k, v = rand_qkv(S)
    out = mesa_attention_reference(q, k, v, T, **SMALL)
    ln = lambda p: math.log(p + 1) / math.log(64)
    # middle chunk 1 [56, 108): query 100 -> keys [0,4) at 0..3, [56,100] at 4..48, q at 48
    keys = list(range(4)) + list(range(56, 101))
    kp = list(range(4)) + list(range(4, 49))
    torch.testing.assert_close(out[100], explicit_row(q, k, v, 100, keys, kp, 48, 1.0))
    # last chunk query 220: n = T = 230, A = 209
    keys = list(range(221))
    kp = [j if j >= 209 else 208 - (208 - j) // 10 for j in keys]
    torch.testing.assert_close(out[220], explicit_row(q, k, v, 220, keys, kp, 220, ln(220)))
    # generated query 261: n = 262, A = 262 - 261 % 52 = 261; query itself at 261
    keys = list(range(262))
    kp = [j if j >= 261 else 260 - (260 - j) // 10 for j in keys]
    torch.testing.assert_close(out[261], explicit_row(q, k, v, 261, keys, kp, 261, ln(261)))
    # generated query 240: n = 241, A = 241 - 240 % 52 = 209
    keys = list(range(241))
    kp = [j if j >= 209 else 208 - (208 - j) // 10 for j in keys]
    torch.testing.assert_close(out[240], explicit_row(q, k, v, 240, keys, kp, 240, ln(240)))
    # a last-chunk query below its anchor (T=190, C=60, A=181, see above): q at pos(150)=177
    out = mesa_attention_reference(q[:190], k[:190], v[:190], 190, 64, 4, 16, 100, 10)
    keys = list(range(151))
    kp = [180 - (180 - j) // 10 for j in keys]
    torch.testing.assert_close(out[150], explicit_row(q, k, v, 150, keys, kp, 177, ln(150)))


def test_blocked_equals_per_query():
    # L=32, F=4, Lc=8, Mmax=4, T=100: X=88, Nq=3, M=4 >= 4 -> C=22, chunks at 4, 26, 48, 70,
    # last chunk [92, 100); generated anchors 89 (p < 110) and 111 (p = 110..114).
    small = dict(L=32, F=4, Lc=8, Mmax=4, E=3)
    assert reference_split(100, 32, 4, 8, 4) == (22, 4)
    q, k, v = rand_qkv(115, seed=3)
    a = mesa_attention_reference(q, k, v, 100, **small, block=1)
    b = mesa_attention_reference(q, k, v, 100, **small, block=16)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- (d) chunk isolation


def test_middle_chunk_sees_only_first_and_own_chunk():
    T = 230
    q, k, v = rand_qkv(T, seed=1)
    base = mesa_attention_reference(q, k, v, T, **SMALL)
    other = torch.ones(T, dtype=torch.bool)
    other[:4] = False
    other[56:108] = False
    k2, v2 = k.clone(), v.clone()
    k2[other] += 5 * torch.randn_like(k2[other])
    v2[other] += 5 * torch.randn_like(v2[other])
    pert = mesa_attention_reference(q, k2, v2, T, **SMALL)
    torch.testing.assert_close(pert[56:108], base[56:108], rtol=0, atol=1e-6)
    torch.testing.assert_close(pert[:4], base[:4], rtol=0, atol=1e-6)  # first chunk causal
    assert not torch.allclose(pert[108:160], base[108:160])  # chunk 2 reads chunk 2
    assert not torch.allclose(pert[212:], base[212:])  # last chunk reads everything
    # and the chunk does read the first chunk and itself
    for sl in (slice(0, 4), slice(56, 80)):
        v3 = v.clone()
        v3[sl] += 1.0
        assert not torch.allclose(mesa_attention_reference(q, k, v3, T, **SMALL)[80:108],
                                  base[80:108])  # fmt: skip


# ---------------------------------------------------------------- (e) rebase


@pytest.mark.parametrize("offset", [1000, 123_457])
def test_shifting_positions_keeps_output(offset):
    q, k, v = rand_qkv(262, seed=2)
    base = mesa_attention_reference(q, k, v, 230, **SMALL)
    shifted = mesa_attention_reference(q, k, v, 230, **SMALL, pos_offset=offset)
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)


def test_rope_angles_relative():
    inv = rope_inv_freq(32, DEFAULT)
    a = rope_angles(torch.tensor([7, 107, 5007]), inv)
    b = rope_angles(torch.tensor([3, 103, 5003]), inv)
    assert a.dtype == torch.float64 and a.shape == (3, 16)
    torch.testing.assert_close(a - b, (4 * inv.double()).expand(3, 16))


# ---------------------------------------------------------------- (f) inv_freq vs HF


INV_FREQ_CASES = [
    DEFAULT,
    {**DEFAULT, "rope_theta": 500000.0},
    LLAMA3,
    {**LLAMA3, "original_max_position_embeddings": 8192},
    LINEAR,
    {**LINEAR, "partial_rotary_factor": 0.5},
]


@pytest.mark.parametrize("rp", INV_FREQ_CASES)
def test_inv_freq_matches_transformers(rp):
    D = 64
    cfg = hf_config(rp, 4, 2, D)
    if rp["rope_type"] == "default":
        ref, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[rp["rope_type"]](cfg)
    ours = rope_inv_freq(D, rp)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=0)


def test_unsupported_rope_type():
    with pytest.raises(NotImplementedError, match="yarn"):
        rope_inv_freq(32, {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})


# ---------------------------------------------------------------- (g) GQA and dtypes


def test_gqa_equals_repeated_kv():
    q, k, v = rand_qkv(262, Hq=6, Hkv=2, seed=4)
    gqa = mesa_attention_reference(q, k, v, 230, **SMALL)
    mha = mesa_attention_reference(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), 230, **SMALL
    )
    torch.testing.assert_close(gqa, mha, rtol=1e-5, atol=1e-5)
    # head h reads KV head h // 3: changing KV head 1 touches query heads 3..5 only
    v2 = v.clone()
    v2[:, 1] += 1
    out = mesa_attention_reference(q, k, v2, 230, **SMALL)
    torch.testing.assert_close(out[:, :3], gqa[:, :3], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, 3:], gqa[:, 3:])


def test_dtype_and_log_n_switch():
    q, k, v = rand_qkv(262, seed=5)
    out = mesa_attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), 230, **SMALL)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    on = mesa_attention_reference(q, k, v, 230, **SMALL)
    off = mesa_attention_reference(q, k, v, 230, **SMALL, log_n=False)
    torch.testing.assert_close(on[:212], off[:212], rtol=0, atol=0)  # no stair query there
    assert not torch.allclose(on[212:], off[212:])
