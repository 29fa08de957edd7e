"""Dense torch reference of the weave-PE variants (``pe``): slow and obvious.

Written from the contract text in docs/VARIANTS.md alone.  It reuses the Mesa/Stair dense
reference (``mesa_vllm.testing.reference``, docs/CONTRACT.md) for the Mesa rules and does not
import ``mesa_vllm.plan`` or ``mesa_vllm.attention``, so it can check them.  Everything is a
full ``S x S`` tensor for one sequence of ``S`` tokens: indices ``p < T`` are prompt tokens,
``p >= T`` generated tokens.  Notation: L training length, d = p - j.

Rules, per query index p:

* n = T for a prompt token, n = p + 1 for a generated token.  **Short** (n <= L): plain
  causal, keys [0, p], rel(p, j) = d, query scale 1.
* **Long**, ``chunked_prefill`` on (``stair``, ``rerope``, ``leaky_rerope``,
  ``self_extend``): first-chunk and middle-chunk prompt tokens follow the Mesa rules
  (DynamicSplit with F, Lc, Mmax; scale 1); last-chunk tokens and long generated tokens
  follow the variant rule.  For ``stair`` the variant rule is Stair PE (stair width E, log-n
  scale), taken from ``reference.reference_positions`` / ``reference.query_scales``.
* **Long**, ``chunked_prefill`` off (required for ``streaming`` / ``lm_infinite``, refused
  for ``stair``): every long query follows the variant rule.
* Variant rule, key j <= p: visible unless ``streaming`` / ``lm_infinite`` and
  j >= S_sink and d >= W.  Near (d < w): rel = d.  Far: rel = fq(p) - fk(j) with

  - ``rerope``: w;
  - ``leaky_rerope``: w + (d - w) / k (fractional);
  - ``self_extend``: floor(p / G) - floor(j / G) + w - floor(w / G);
  - ``streaming``: min(p, S_sink + W - 1) - j;
  - ``lm_infinite``: W.

  Query scale max(1, ln(p + 1) / ln(L)) when ``log_n`` is on, else 1.

Attention: score(p, j) = scale * <R(rel[p, j]) (qscale[p] q_p), k_j>, softmax over the
visible keys, times v.  RoPE is a rotation, so this equals <R(a) q, R(b) k> for any a - b =
rel; the computation uses the equivalent <qscale[p] q_p, R(-rel[p, j]) k_j> (one rotation
per KV head instead of per query head).  Bounds that depend on L (window <= L - 1, S_sink +
W <= L, ...) are startup validation, not checked here: the formulas are defined for any
window >= 1, which lets tests use windows wider than every distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mesa_vllm.testing.reference import (
    _query_rule,
    query_scales,
    reference_positions,
    rope_angles,
    rope_inv_freq,
)

PES = ("stair", "rerope", "leaky_rerope", "self_extend", "streaming", "lm_infinite")
CHUNKABLE = ("stair", "rerope", "leaky_rerope", "self_extend")


@dataclass(frozen=True)
class VariantSpec:
    """Resolved (no "auto") variant parameters of docs/VARIANTS.md.

    pe: one of ``PES``.  chunked_prefill: Mesa chunked prefill (required for ``stair``,
    refused for ``streaming`` / ``lm_infinite``).  window: w (``rerope``, ``leaky_rerope``,
    ``self_extend``) or W (``streaming``, ``lm_infinite``), >= 1.  leaky_factor: k >= 1
    (``leaky_rerope``).  group_size: G >= 1 (``self_extend``).  sink_tokens: S_sink >= 0
    (``streaming``, ``lm_infinite``).  log_n: log-n query scaling of variant-rule queries.
    F, Lc, Mmax, E: Mesa first chunk, last-chunk target, max remainder, stair width (used by
    chunked prefill, E by ``stair`` only).  Fields a pe does not use are ignored.
    """

    pe: str
    chunked_prefill: bool
    window: int
    leaky_factor: float
    group_size: int
    sink_tokens: int
    log_n: bool
    F: int
    Lc: int
    Mmax: int
    E: int

    def __post_init__(self) -> None:
        if self.pe not in PES:
            raise ValueError(f"pe: {self.pe!r} is not one of {PES}")
        if self.chunked_prefill and self.pe not in CHUNKABLE:
            raise ValueError(f"chunked_prefill: true is refused for pe={self.pe!r}")
        if not self.chunked_prefill and self.pe == "stair":
            raise ValueError("chunked_prefill: false is refused for pe='stair'")
        if int(self.window) != self.window or self.window < 1:
            raise ValueError(f"window: need an integer >= 1 (got {self.window})")
        if not self.leaky_factor >= 1.0:
            raise ValueError(f"leaky_factor: need >= 1 (got {self.leaky_factor})")
        if int(self.group_size) != self.group_size or self.group_size < 1:
            raise ValueError(f"group_size: need an integer >= 1 (got {self.group_size})")
        if int(self.sink_tokens) != self.sink_tokens or self.sink_tokens < 0:
            raise ValueError(f"sink_tokens: need an integer >= 0 (got {self.sink_tokens})")


def _variant_rule(
    S: int, L: int, spec: VariantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The variant rule (pe other than stair) applied to every query p < S.

    Returns (mask bool [S, S], rel float64 [S, S] (0 where masked), scale float32 [S]).
    """
    P = torch.arange(S, dtype=torch.int64)[:, None]
    J = torch.arange(S, dtype=torch.int64)[None, :]
    d = P - J
    w = int(spec.window)
    near = d < w
    mask = J <= P
    if spec.pe == "rerope":
        far = torch.full((S, S), float(w), dtype=torch.float64)
    elif spec.pe == "leaky_rerope":
        far = w + (d - w).to(torch.float64) / float(spec.leaky_factor)
    elif spec.pe == "self_extend":
        G = int(spec.group_size)
        fq = torch.div(P, G, rounding_mode="floor") + w - w // G
        far = (fq - torch.div(J, G, rounding_mode="floor")).to(torch.float64)
    elif spec.pe == "streaming":
        mask = mask & ((J < int(spec.sink_tokens)) | near)
        far = (P.clamp(max=int(spec.sink_tokens) + w - 1) - J).to(torch.float64)
    elif spec.pe == "lm_infinite":
        mask = mask & ((J < int(spec.sink_tokens)) | near)
        far = torch.full((S, S), float(w), dtype=torch.float64)
    else:
        raise AssertionError(f"no variant rule for pe={spec.pe!r}")
    rel = torch.where(near, d.to(torch.float64), far)
    rel = torch.where(mask, rel, torch.zeros_like(rel))
    scale = torch.ones(S, dtype=torch.float32)
    if spec.log_n:
        for p in range(S):
            scale[p] = max(1.0, math.log(p + 1) / math.log(L))
    return mask, rel, scale


def variant_rel_positions(
    T_prompt: int, seq_len: int, L: int, spec: VariantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Visible keys, relative positions and query scales of every query of one sequence.

    Args: prompt length T_prompt, total tokens seq_len (prompt + generated), training length
    L, resolved ``spec``.

    Returns ``(mask, rel, qscale)``: mask bool [S, S], mask[p, j] true when query p attends
    key j; rel float64 [S, S], the relative position (query position minus key position)
    used for the score of (p, j), 0 where mask is false; qscale float32 [S], the query
    multiplier.
    """
    S = seq_len
    if not (S >= 1 and 0 <= T_prompt <= S and L >= 2):
        raise ValueError(
            f"need seq_len >= 1, 0 <= T_prompt <= seq_len, L >= 2 (got {T_prompt}, {S}, {L})"
        )
    # Which rule each row follows: short (plain causal), mesa (reference.py rows: first and
    # middle chunks of a chunked prefill, and every long row of stair), or variant.
    rule = []
    for p in range(S):
        n = T_prompt if p < T_prompt else p + 1
        if n <= L:
            rule.append("short")
        elif spec.chunked_prefill and (
            spec.pe == "stair"
            or _query_rule(p, T_prompt, L, spec.F, spec.Lc, spec.Mmax)[0] != "stair"
        ):
            rule.append("mesa")
        else:
            rule.append("variant")

    P = torch.arange(S, dtype=torch.int64)[:, None]
    J = torch.arange(S, dtype=torch.int64)[None, :]
    mask = J <= P  # short rows: plain causal, rel = p - j, scale 1
    rel = torch.where(mask, (P - J).to(torch.float64), 0.0)
    qscale = torch.ones(S, dtype=torch.float32)
    for name in ("mesa", "variant"):
        rows = torch.tensor([r == name for r in rule], dtype=torch.bool)
        if not bool(rows.any()):
            continue
        if name == "mesa":
            m_mask, qpos, kpos = reference_positions(
                T_prompt, S, L, spec.F, spec.Lc, spec.Mmax, spec.E
            )
            m_rel = torch.where(m_mask, (qpos[:, None] - kpos).to(torch.float64), 0.0)
            m_scale = query_scales(T_prompt, S, L, spec.log_n, F=spec.F, Lc=spec.Lc, Mmax=spec.Mmax)
        else:
            m_mask, m_rel, m_scale = _variant_rule(S, L, spec)
        mask[rows], rel[rows], qscale[rows] = m_mask[rows], m_rel[rows], m_scale[rows]
    return mask, rel, qscale


def _distinct(rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, index) with values[index] == rel: the distinct relative positions of rel."""
    if torch.equal(rel, rel.round()):  # integer-valued (every pe but leaky_rerope): no sort
        lo, hi = int(rel.min()), int(rel.max())
        return torch.arange(lo, hi + 1, dtype=torch.float64), rel.long() - lo
    return torch.unique(rel, return_inverse=True)


def variant_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    T_prompt: int,
    L: int,
    spec: VariantSpec,
    rope_parameters: dict | None = None,
    scale: float | None = None,
    block: int = 64,
) -> torch.Tensor:
    """Variant attention of one sequence, dense.

    q: [S, Hq, D]; k, v: [S, Hkv, D] (Hq a multiple of Hkv; query head h reads KV head
    h // (Hq // Hkv)), any float dtype, NOT rotated.  score(p, j) = scale *
    <R(rel[p, j]) (qscale[p] q_p), k_j> with ``variant_rel_positions``; masked softmax; @ v.
    ``scale`` defaults to D ** -0.5.  float32 math, float64 angles; partial rotary dims pass
    through.  Returns [S, Hq, D] in q's dtype.

    RoPE convention of ``reference.apply_rope`` (neox: dim i pairs with dim i + R/2), written
    with complex numbers: a pair is z = x_i + 1j * x_{i+R/2} and R(a) multiplies it by
    exp(1j * a * inv_freq_i); <x, y> over the pairs is Re(sum conj(z_x) z_y).  The score is
    computed as <qscale q_p, R(-rel) k_j> (the same number: R(a) is orthogonal, R(a)^T =
    R(-a)), so one rotation per KV head instead of per query head.  Angles are float64,
    computed once per distinct rel value, cast to float32 like ``apply_rope``.  Queries are
    processed ``block`` rows at a time (speed only).
    """
    S, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    assert Hq == G * Hkv and k.shape == (S, Hkv, D) and v.shape == k.shape
    scale = D**-0.5 if scale is None else scale
    mask, rel, qs = variant_rel_positions(T_prompt, S, L, spec)
    inv_freq = rope_inv_freq(D, rope_parameters)
    half = inv_freq.numel()
    R = 2 * half
    vals, idx = _distinct(rel)
    ang = rope_angles(-vals, inv_freq, rope_parameters)  # [U, R/2]: keys turn by -rel
    turn = torch.complex(ang.cos().float(), ang.sin().float())  # exp(-1j * rel * inv_freq)
    qf = (q.float() * (qs * scale)[:, None, None]).view(S, Hkv, G, D)  # softmax scale too
    qf = qf.permute(1, 0, 2, 3).contiguous()  # [Hkv, S, G, D]
    kf = k.float().transpose(0, 1).contiguous()  # [Hkv, S, D]
    vf = v.float().transpose(0, 1).contiguous()
    q_pairs = torch.stack((qf[..., :half], qf[..., half:R]), dim=-1)  # [Hkv, S, G, R/2, 2]
    kc = torch.complex(kf[..., :half], kf[..., half:R])  # [Hkv, S, R/2]
    masked = ~mask
    out = torch.empty(Hkv, S, G, D, dtype=torch.float32)
    for p0 in range(0, S, block):
        p1 = min(S, p0 + block)  # every rule only reads keys j <= p < p1
        B, K = p1 - p0, p1
        turn_b = turn.index_select(0, idx[p0:p1, :p1].reshape(-1)).view(1, B, K, half)
        k_rot = torch.view_as_real(kc[:, None, :p1] * turn_b)  # [Hkv, B, K, R/2, 2]
        # <q, R(-rel) k> = sum over pairs of (q_i, q_{i+R/2}) . (turned k pair)
        scores = torch.einsum("hbgix,hbkix->hbgk", q_pairs[:, p0:p1], k_rot)
        if R < D:  # partial rotary: dims past R are not rotated
            scores = scores + torch.einsum("hbgi,hki->hbgk", qf[:, p0:p1, :, R:], kf[:, :p1, R:])
        scores.masked_fill_(masked[None, p0:p1, None, :p1], float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(Hkv, B * G, K)
        out[:, p0:p1] = torch.bmm(probs, vf[:, :p1]).view(Hkv, B, G, D)
    return out.permute(1, 0, 2, 3).reshape(S, Hq, D).to(q.dtype)
