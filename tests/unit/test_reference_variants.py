"""The dense weave-PE variant reference against docs/VARIANTS.md, by hand and by identities."""

from __future__ import annotations

import math

import pytest
import torch

from mesa_vllm.testing.cases import LLAMA3_ROPE
from mesa_vllm.testing.reference import (
    apply_rope,
    causal_attention_reference,
    mesa_attention_reference,
    query_scales,
    reference_positions,
    reference_split,
    rope_angles,
    rope_inv_freq,
)
from mesa_vllm.testing.reference_variants import (
    PES,
    VariantSpec,
    variant_attention_reference,
    variant_rel_positions,
)

pytestmark = pytest.mark.unit

VARIANT_PES = [pe for pe in PES if pe != "stair"]
CHUNKED_PES = ["stair", "rerope", "leaky_rerope", "self_extend"]
LLAMA3 = LLAMA3_ROPE
PARTIAL = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}


def make_spec(pe: str, **over) -> VariantSpec:
    """The tiny setting of the hand-computed cases: w = W = 3, k = 2, G = 2, S_sink = 2;
    Mesa F = 2, Lc = 2, Mmax = 1, E = 2; log-n off unless asked."""
    fields = dict(
        pe=pe, chunked_prefill=pe == "stair", window=3, leaky_factor=2.0, group_size=2,
        sink_tokens=2, log_n=False, F=2, Lc=2, Mmax=1, E=2,
    )  # fmt: skip
    fields.update(over)
    return VariantSpec(**fields)


def rand_qkv(S: int, Hq: int = 4, Hkv: int = 2, D: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, Hq, D, generator=g) * 2
    k = torch.randn(S, Hkv, D, generator=g) * 2
    v = torch.randn(S, Hkv, D, generator=g)
    return q, k, v


def row(rel: torch.Tensor, mask: torch.Tensor, p: int) -> tuple[list[float], list[bool]]:
    return rel[p, : p + 1].tolist(), mask[p, : p + 1].tolist()


# ---------------------------------------------------------------- hand-computed rows
# L = 8, T = S = 12 (a long prompt, no chunking): every row follows the variant rule.
L8 = 8
HAND_ROWS = {
    # rerope: d < 3 -> d, else 3
    ("rerope", 9): [3, 3, 3, 3, 3, 3, 3, 2, 1, 0],
    ("rerope", 0): [0],
    # leaky_rerope: d >= 3 -> 3 + (d - 3) / 2
    ("leaky_rerope", 9): [6, 5.5, 5, 4.5, 4, 3.5, 3, 2, 1, 0],
    ("leaky_rerope", 4): [3.5, 3, 2, 1, 0],
    # self_extend: d >= 3 -> floor(p/2) - floor(j/2) + 3 - 1
    ("self_extend", 9): [6, 6, 5, 5, 4, 4, 3, 2, 1, 0],
    ("self_extend", 10): [7, 7, 6, 6, 5, 5, 4, 4, 2, 1, 0],
    # streaming (S_sink 2, W 3, cache S + W - 1 = 4): sinks at min(p, 4) - j
    ("streaming", 3): [3, 2, 1, 0],  # before the cache fills: everything visible, rel = d
    ("streaming", 4): [4, 3, 2, 1, 0],  # cache just full
    ("streaming", 5): [4, 3, 0, 2, 1, 0],  # j = 2 evicted; the query sits at 4
    ("streaming", 9): [4, 3, 0, 0, 0, 0, 0, 2, 1, 0],
    # lm_infinite (S_sink 2, W 3): far (sink) keys at distance W = 3
    ("lm_infinite", 3): [3, 2, 1, 0],
    ("lm_infinite", 4): [3, 3, 2, 1, 0],
    ("lm_infinite", 5): [3, 3, 0, 2, 1, 0],
    ("lm_infinite", 9): [3, 3, 0, 0, 0, 0, 0, 2, 1, 0],
}
HAND_MASKS = {
    ("streaming", 3): [1, 1, 1, 1],
    ("streaming", 4): [1, 1, 1, 1, 1],
    ("streaming", 5): [1, 1, 0, 1, 1, 1],
    ("streaming", 9): [1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
    ("lm_infinite", 4): [1, 1, 1, 1, 1],
    ("lm_infinite", 5): [1, 1, 0, 1, 1, 1],
    ("lm_infinite", 9): [1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
}


@pytest.mark.parametrize("pe,p", sorted(HAND_ROWS))
def test_hand_rows_long_prompt(pe, p):
    mask, rel, qs = variant_rel_positions(12, 12, L8, make_spec(pe))
    got_rel, got_mask = row(rel, mask, p)
    assert got_rel == [float(x) for x in HAND_ROWS[(pe, p)]]
    assert got_mask == [bool(x) for x in HAND_MASKS.get((pe, p), [1] * (p + 1))]
    assert not mask[p, p + 1 :].any() and not rel[p, p + 1 :].any()  # causal, 0 if masked
    assert (rel[~mask] == 0).all()
    assert (qs == 1).all()  # log-n off


def test_hand_rows_generated_tokens_cross_L():
    """T = 6 <= L: prompt rows and generated rows with p + 1 <= 8 are plain causal; p = 8
    (n = 9 > L) follows the variant rule."""
    mask, rel, qs = variant_rel_positions(6, 11, L8, make_spec("rerope", log_n=True))
    assert row(rel, mask, 7)[0] == [7, 6, 5, 4, 3, 2, 1, 0]
    assert row(rel, mask, 8)[0] == [3, 3, 3, 3, 3, 3, 2, 1, 0]
    assert row(rel, mask, 10)[0] == [3] * 8 + [2, 1, 0]
    assert mask.equal(torch.ones(11, 11, dtype=torch.bool).tril())
    assert qs[:8].tolist() == [1.0] * 8
    assert qs[8].item() == pytest.approx(math.log(9) / math.log(8), rel=1e-7)
    assert qs[10].item() == pytest.approx(math.log(11) / math.log(8), rel=1e-7)


def test_hand_log_n_long_prompt():
    """Every row of a long prompt is long: scale max(1, ln(p+1)/ln L), so 1 up to p = 7."""
    _, _, qs = variant_rel_positions(12, 12, L8, make_spec("leaky_rerope", log_n=True))
    want = [max(1.0, math.log(p + 1) / math.log(8)) for p in range(12)]
    assert qs.tolist() == pytest.approx(want, rel=1e-7)
    assert qs[:8].tolist() == [1.0] * 8 and qs[9].item() > 1.1


# Chunked prefill, L = 8, F = 2, Lc = 2, Mmax = 1, E = 2, T = 14: X = 10, Nq = 1, M = 4 >= 1
# -> C = 10 // 2 = 5, two middle chunks [2, 7) and [7, 12), last chunk [12, 14).  Stair
# anchor of the last chunk A = 14 - (13 mod 5) = 11: pos(j) = 10 - floor((10 - j) / 2) below.
CHUNK_ROWS_MESA = {
    1: ([1, 0], [1, 1]),  # first chunk: causal
    4: ([4, 3, 2, 1, 0], [1, 1, 1, 1, 1]),  # middle chunk at 2: positions are the indices
    9: ([4, 3, 0, 0, 0, 0, 0, 2, 1, 0], [1, 1, 0, 0, 0, 0, 0, 1, 1, 1]),  # middle chunk at 7
}
CHUNK_ROWS_LAST = {
    "stair": {
        12: [7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 0],
        13: [8, 7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 1, 0],
    },
    "rerope": {12: [3] * 10 + [2, 1, 0], 13: [3] * 11 + [2, 1, 0], 15: [3] * 13 + [2, 1, 0]},
    "leaky_rerope": {13: [8, 7.5, 7, 6.5, 6, 5.5, 5, 4.5, 4, 3.5, 3, 2, 1, 0]},
    "self_extend": {13: [6 - j // 2 + 2 for j in range(11)] + [2, 1, 0]},
}


def test_hand_split_of_chunk_case():
    assert reference_split(14, 8, 2, 2, 1) == (5, 2)


@pytest.mark.parametrize("pe", CHUNKED_PES)
def test_hand_rows_chunked(pe):
    spec = make_spec(pe, chunked_prefill=True, log_n=True)
    mask, rel, qs = variant_rel_positions(14, 16, L8, spec)
    for p, (want_rel, want_mask) in CHUNK_ROWS_MESA.items():
        assert row(rel, mask, p) == ([float(x) for x in want_rel], [bool(x) for x in want_mask])
        assert qs[p].item() == 1.0  # Mesa rows are never scaled
    for p, want_rel in CHUNK_ROWS_LAST[pe].items():
        assert row(rel, mask, p) == ([float(x) for x in want_rel], [True] * (p + 1))
        assert qs[p].item() == pytest.approx(math.log(p + 1) / math.log(8), rel=1e-7)


# ---------------------------------------------------------------- brute force of the table


def brute_rel(T: int, S: int, L: int, spec: VariantSpec):
    """Scalar, per-(p, j) transcription of docs/VARIANTS.md for non-chunked specs, far rel
    taken as fq(p) - fk(j) from the table's fq and fk columns."""
    w, k, G, Ss = spec.window, spec.leaky_factor, spec.group_size, spec.sink_tokens
    fq = {
        "rerope": lambda p: w,
        "leaky_rerope": lambda p: p / k + w - w / k,
        "self_extend": lambda p: math.floor(p / G) + w - math.floor(w / G),
        "streaming": lambda p: min(p, Ss + w - 1),
        "lm_infinite": lambda p: w,
    }[spec.pe]
    fk = {
        "rerope": lambda j: 0,
        "leaky_rerope": lambda j: j / k,
        "self_extend": lambda j: math.floor(j / G),
        "streaming": lambda j: j,
        "lm_infinite": lambda j: 0,
    }[spec.pe]
    mask = torch.zeros(S, S, dtype=torch.bool)
    rel = torch.zeros(S, S, dtype=torch.float64)
    qs = torch.ones(S, dtype=torch.float32)
    for p in range(S):
        n = T if p < T else p + 1
        long = n > L
        if long and spec.log_n:
            qs[p] = max(1.0, math.log(p + 1) / math.log(L))
        for j in range(p + 1):
            d = p - j
            visible = True
            if long and spec.pe in ("streaming", "lm_infinite"):
                visible = j < Ss or d < w
            if not visible:
                continue
            mask[p, j] = True
            rel[p, j] = d if (not long or d < w) else fq(p) - fk(j)
    return mask, rel, qs


BRUTE_CASES = [
    # (pe, T, S, L, window, leaky_factor, group_size, sink_tokens)
    ("rerope", 40, 45, 16, 5, 1.0, 1, 0),
    ("rerope", 10, 45, 16, 15, 1.0, 1, 0),
    ("leaky_rerope", 40, 45, 16, 5, 3.0, 1, 0),
    ("leaky_rerope", 40, 45, 16, 7, 2.5, 1, 0),
    ("self_extend", 40, 45, 16, 5, 1.0, 3, 0),
    ("self_extend", 12, 45, 16, 6, 1.0, 4, 0),
    ("streaming", 40, 45, 16, 12, 1.0, 1, 4),
    ("streaming", 40, 45, 16, 16, 1.0, 1, 0),
    ("streaming", 5, 45, 16, 5, 1.0, 1, 3),
    ("lm_infinite", 40, 45, 16, 16, 1.0, 1, 4),
    ("lm_infinite", 40, 45, 16, 6, 1.0, 1, 1),
    ("lm_infinite", 16, 45, 16, 9, 1.0, 1, 0),
]


@pytest.mark.parametrize("pe,T,S,L,w,kf,G,Ss", BRUTE_CASES)
@pytest.mark.parametrize("log_n", [False, True])
def test_matches_brute_force(pe, T, S, L, w, kf, G, Ss, log_n):
    spec = make_spec(pe, window=w, leaky_factor=kf, group_size=G, sink_tokens=Ss, log_n=log_n)
    mask, rel, qs = variant_rel_positions(T, S, L, spec)
    b_mask, b_rel, b_qs = brute_rel(T, S, L, spec)
    assert mask.equal(b_mask)
    torch.testing.assert_close(rel, b_rel, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(qs, b_qs, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- Mesa rows and stair

# L = 64, F = 4, Lc = 16, Mmax = 8, E = 10, T = 230: C = 52, 4 middle chunks at 4, 56, 108,
# 160, last chunk [212, 230) (the setting of test_reference.py).
MESA = dict(F=4, Lc=16, Mmax=8, E=10)


def test_stair_is_the_mesa_reference():
    spec = make_spec("stair", window=32, log_n=True, **MESA)
    T, S, L = 230, 250, 64
    mask, rel, qs = variant_rel_positions(T, S, L, spec)
    m_mask, qpos, kpos = reference_positions(T, S, L, **MESA)
    assert mask.equal(m_mask)
    assert rel.equal(torch.where(m_mask, (qpos[:, None] - kpos).double(), 0.0))
    assert qs.equal(query_scales(T, S, L, True, F=4, Lc=16, Mmax=8))
    q, k, v = rand_qkv(S)
    got = variant_attention_reference(q, k, v, T, L, spec)
    want = mesa_attention_reference(q, k, v, T, L, **MESA, log_n=True)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("pe", ["rerope", "leaky_rerope", "self_extend"])
def test_chunked_variant_rows(pe):
    """Chunked: first/middle rows are the Mesa (= stair spec) rows; last-chunk and long
    generated rows are the non-chunked variant's rows and differ from stair."""
    T, S, L = 230, 250, 64
    kw = dict(window=20, leaky_factor=2.0, group_size=4, log_n=True, **MESA)
    chunked = variant_rel_positions(T, S, L, make_spec(pe, chunked_prefill=True, **kw))
    plain = variant_rel_positions(T, S, L, make_spec(pe, chunked_prefill=False, **kw))
    stair = variant_rel_positions(T, S, L, make_spec("stair", **kw))
    C, n_mid = reference_split(T, L, 4, 16, 8)
    s_last = 4 + n_mid * C
    assert s_last == 212
    for a, b in zip(chunked, stair, strict=True):  # Mesa rows equal the stair spec, bit for bit
        assert a[:s_last].equal(b[:s_last])
    for a, b in zip(chunked, plain, strict=True):  # variant rows equal the non-chunked variant
        assert a[s_last:].equal(b[s_last:])
    assert not chunked[0][:s_last].equal(plain[0][:s_last])  # middle chunks are masked
    last_rel = chunked[1][s_last:]
    assert (last_rel != stair[1][s_last:]).any(dim=1).all()  # every variant row differs


# ---------------------------------------------------------------- attention


def explicit_rows(q, k, v, rows, mask, rel, qs, rope_parameters=None, scale=None):
    """One query at a time, one head at a time: rotate the query by rel[p, j] for each
    visible key j (apply_rope), dot with the unrotated key, softmax, weight v."""
    S, Hq, D = q.shape
    G = Hq // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    inv = rope_inv_freq(D, rope_parameters)
    out = torch.zeros(len(rows), Hq, D, dtype=torch.float64)
    for i, p in enumerate(rows):
        keys = [j for j in range(S) if mask[p, j]]
        ang = rope_angles(rel[p, keys], inv)  # [K, R/2], fractional rel allowed
        for h in range(Hq):
            qp = (q[p, h].float() * qs[p]).expand(len(keys), D)
            q_rot = apply_rope(qp, ang)  # [K, D]: the query turned for each key
            kv = h // G
            s = torch.stack([q_rot[n] @ k[j, kv].float() for n, j in enumerate(keys)])
            w = torch.softmax(s.double() * scale, dim=0)
            out[i, h] = sum(w[n] * v[j, kv].double() for n, j in enumerate(keys))
    return out


EXPLICIT_CASES = [
    # (spec kwargs, T, S, L, rows)
    (dict(pe="rerope", window=5, log_n=True), 30, 34, 16, [0, 7, 20, 29, 33]),
    (dict(pe="leaky_rerope", window=5, leaky_factor=2.5, log_n=True), 30, 34, 16, [3, 20, 33]),
    (dict(pe="self_extend", window=4, group_size=3), 30, 34, 16, [2, 21, 33]),
    (dict(pe="streaming", window=10, sink_tokens=3), 30, 34, 16, [5, 14, 25, 33]),
    (dict(pe="lm_infinite", window=7, sink_tokens=2), 30, 34, 16, [5, 14, 25, 33]),
    (dict(pe="stair", window=5, log_n=True, F=3, Lc=4, Mmax=2, E=3), 30, 34, 16, [2, 9, 28, 33]),
    (
        dict(pe="rerope", chunked_prefill=True, window=5, log_n=True, F=3, Lc=4, Mmax=2, E=3),
        30,
        34,
        16,
        [2, 9, 28, 33],
    ),  # fmt: skip
    (dict(pe="leaky_rerope", window=5, leaky_factor=2.0), 8, 20, 16, [4, 15, 16, 19]),
]


@pytest.mark.parametrize("rope_parameters", [None, LLAMA3, PARTIAL])
@pytest.mark.parametrize("kw,T,S,L,rows", EXPLICIT_CASES)
def test_attention_matches_explicit_rows(kw, T, S, L, rows, rope_parameters):
    spec = make_spec(**kw)
    q, k, v = rand_qkv(S, Hq=4, Hkv=2, D=16, seed=3)
    got = variant_attention_reference(q, k, v, T, L, spec, rope_parameters, block=8)
    mask, rel, qs = variant_rel_positions(T, S, L, spec)
    want = explicit_rows(q, k, v, rows, mask, rel, qs, rope_parameters)
    torch.testing.assert_close(got[rows].double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pe", PES)
@pytest.mark.parametrize("T,S", [(16, 16), (5, 16), (1, 9)])
def test_short_sequences_are_plain_causal(pe, T, S):
    """T <= L and every generated p + 1 <= L: all queries short, stock attention."""
    spec = make_spec(pe, window=2, log_n=True, leaky_factor=3.0, group_size=3, F=4)
    q, k, v = rand_qkv(S, seed=1)
    mask, rel, qs = variant_rel_positions(T, S, 16, spec)
    assert mask.equal(torch.ones(S, S, dtype=torch.bool).tril()) and (qs == 1).all()
    got = variant_attention_reference(q, k, v, T, 16, spec)
    torch.testing.assert_close(got, causal_attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


IDENTITY_CASES = [
    dict(pe="rerope", window=200),  # window >= every distance: never far
    dict(pe="leaky_rerope", window=5, leaky_factor=1.0),  # w + (d - w) / 1 = d
    dict(pe="leaky_rerope", window=1, leaky_factor=1.0),
    dict(pe="self_extend", window=5, group_size=1),  # p - j + w - w = d
    dict(pe="self_extend", window=1, group_size=1),
    dict(pe="streaming", window=200, sink_tokens=4),  # every key recent
    dict(pe="lm_infinite", window=200, sink_tokens=0),
    dict(pe="leaky_rerope", window=200, leaky_factor=4.0),
]


@pytest.mark.parametrize("kw", IDENTITY_CASES)
@pytest.mark.parametrize("rope_parameters", [None, PARTIAL])
def test_identities_equal_plain_causal(kw, rope_parameters):
    T, S, L = 100, 120, 32
    spec = make_spec(**kw)
    mask, rel, _ = variant_rel_positions(T, S, L, spec)
    P, J = torch.arange(S)[:, None], torch.arange(S)[None, :]
    assert mask.equal(J <= P)
    assert rel.equal(torch.where(J <= P, (P - J).double(), 0.0))
    q, k, v = rand_qkv(S, seed=2)
    got = variant_attention_reference(q, k, v, T, L, spec, rope_parameters)
    want = causal_attention_reference(q, k, v, rope_parameters)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_log_n_is_a_query_scale():
    """rerope with a window wider than every distance and log-n on is causal attention on
    queries scaled by max(1, ln(p+1)/ln L) (every row of a long prompt is long)."""
    T, S, L = 100, 120, 32
    q, k, v = rand_qkv(S, seed=4)
    got = variant_attention_reference(q, k, v, T, L, make_spec("rerope", window=500, log_n=True))
    s = torch.tensor([max(1.0, math.log(p + 1) / math.log(L)) for p in range(S)])
    want = causal_attention_reference(q * s[:, None, None], k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, causal_attention_reference(q, k, v), atol=1e-3)


@pytest.mark.parametrize("pe", ["streaming", "lm_infinite"])
def test_window_L_no_sinks_is_causal_below_L(pe):
    """A long prompt with W = L (lm_infinite) / S_sink + W = L (streaming), no sinks: rows
    p < L see every key at its distance (plain causal); later rows are windowed."""
    T, S, L = 90, 100, 32
    spec = make_spec(pe, window=L, sink_tokens=0)
    q, k, v = rand_qkv(S, seed=5)
    got = variant_attention_reference(q, k, v, T, L, spec)
    want = causal_attention_reference(q, k, v)
    torch.testing.assert_close(got[:L], want[:L], rtol=1e-5, atol=1e-5)
    assert (got[L:] - want[L:]).abs().amax(dim=(1, 2)).min() > 1e-4
    # later rows: attention over the last L keys only, at positions 0..L-1
    for p in (L, 60, S - 1):
        sub = causal_attention_reference(
            q[p - L + 1 : p + 1], k[p - L + 1 : p + 1], v[p - L + 1 : p + 1]
        )
        torch.testing.assert_close(got[p], sub[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pe", PES)
def test_gqa_equals_repeated_kv(pe):
    T, S, L = 70, 80, 32
    spec = make_spec(pe, chunked_prefill=pe == "stair", window=6, sink_tokens=3, log_n=True,
                     F=4, Lc=8, Mmax=4, E=3)  # fmt: skip
    q, k, v = rand_qkv(S, Hq=6, Hkv=2, seed=6)
    got = variant_attention_reference(q, k, v, T, L, spec)
    rep = variant_attention_reference(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), T, L, spec
    )
    torch.testing.assert_close(got, rep, rtol=1e-5, atol=1e-5)
    # and head h really reads KV head h // 3: swapping KV heads changes heads 0-2 only
    swap = variant_attention_reference(q, k.flip(1), v.flip(1), T, L, spec)
    assert not torch.allclose(swap[:, :3], got[:, :3], atol=1e-3)
    hybrid = variant_attention_reference(q[:, 3:], k[:, 1:], v[:, 1:], T, L, spec)
    torch.testing.assert_close(got[:, 3:], hybrid, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pe", ["leaky_rerope", "streaming", "stair"])
def test_blocks_and_dtype(pe):
    """Row blocking is for speed only; a bf16 input comes back bf16."""
    T, S, L = 90, 100, 32
    spec = make_spec(pe, chunked_prefill=pe == "stair", window=9, log_n=True, F=5, Lc=10,
                     Mmax=5, E=4)  # fmt: skip
    q, k, v = rand_qkv(S, seed=7)
    ref = variant_attention_reference(q, k, v, T, L, spec, block=1000)  # one block
    for block in (5, 37):
        got = variant_attention_reference(q, k, v, T, L, spec, block=block)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    out = variant_attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), T, L, spec)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert torch.isfinite(out.float()).all()


def test_scale_argument():
    T, S, L = 40, 40, 16
    spec = make_spec("rerope", window=500)
    q, k, v = rand_qkv(S, seed=8)
    got = variant_attention_reference(q, k, v, T, L, spec, scale=0.3)
    want = causal_attention_reference(q, k, v, scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "over,field",
    [
        (dict(pe="stair", chunked_prefill=False), "chunked_prefill"),
        (dict(pe="streaming", chunked_prefill=True), "chunked_prefill"),
        (dict(pe="lm_infinite", chunked_prefill=True), "chunked_prefill"),
        (dict(pe="rope"), "pe"),
        (dict(pe="rerope", window=0), "window"),
        (dict(pe="leaky_rerope", leaky_factor=0.5), "leaky_factor"),
        (dict(pe="self_extend", group_size=0), "group_size"),
        (dict(pe="streaming", sink_tokens=-1), "sink_tokens"),
    ],
)
def test_spec_validation(over, field):
    with pytest.raises(ValueError, match=field):
        make_spec(**over)


def test_spec_is_frozen():
    spec = make_spec("rerope")
    with pytest.raises(AttributeError):
        spec.window = 4  # type: ignore[misc]
