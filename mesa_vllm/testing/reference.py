"""Dense torch reference of the Mesa contract (docs/CONTRACT.md): slow and obvious.

Written from the contract text alone (it does not import ``mesa_vllm.plan``), so the two can
check each other.  Everything is a full ``S x S`` tensor for one sequence of ``S`` tokens:
indices ``p < T`` are prompt tokens, ``p >= T`` are generated tokens.

Rules, per query index p (L training length, F first chunk, C chunk width, E stair width):

* ``causal``: T <= L and p + 1 <= L, or p < F of a long prompt: keys [0, p], positions are
  the indices.
* ``middle`` (prompt token in middle chunk k starting at s): keys [0, F) and [s, p]; key
  position i (i < F) or F + (i - s); query position F + (p - s).
* ``stair`` (prompt token of the last chunk, n = T; or a generated token with p + 1 > L,
  n = p + 1): keys [0, p]; anchor A = n - ((n - 1) mod C), or n - W if that is smaller
  (W = ``near_window``, 0 by default); every token j <= p, the query included, has
  pos(j) = j if j >= A else A - 1 - floor((A - 1 - j) / E).  The query is scaled by
  max(1, ln(p + 1) / ln(L)) when log-n scaling is on.
* ``E = "auto"``: each stair query set (one n, hence one anchor) takes the smallest integer
  E >= 1 for which no query of that n sees a relative position above L - 1 (the largest:
  query n - 1 against key 0).  Here it is found by trying E = 1, 2, ... on the positions
  themselves (``auto_stair_width``), not by a closed form.
"""

from __future__ import annotations

import functools
import math

import torch

DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


# ---------------------------------------------------------------- DynamicSplit and rules


def reference_split(
    T: int, L: int, F: int, Lc: int, Mmax: int, *, split: str = "dynamic", width: int | None = None
) -> tuple[int, int]:
    """The chunk plan of a prompt of T tokens: returns (C, n_mid).

    ``split="dynamic"``, DynamicSplit (paper Algorithm 2): T <= L, or X = T - Lc - F <= 0:
    no middle chunk, C = L - F.  Else Nq = X // (L - F), M = X mod (L - F); M < Mmax:
    C = L - F with Nq middle chunks, otherwise C = X // (Nq + 1) with Nq + 1 middle chunks.

    ``split="fixed"``: C = ``width`` (the middle-chunk width, 1 <= width <= L - F; None means
    L - F) for every long prompt; a long prompt (T > L) takes middle chunks one after the
    other for as long as a whole further chunk still leaves at least Lc tokens after it (none
    when fewer than C + Lc tokens follow the first chunk).  A short prompt (T <= L) reports
    C = L - F, the width of the tokens it generates past L.

    Middle chunk k is [F + kC, F + (k+1)C); the last chunk is [F + n_mid * C, T).
    """
    if not (0 < F < L and Lc >= 1 and Mmax >= 0):
        raise ValueError(f"need 0 < F < L, Lc >= 1, Mmax >= 0 (got F={F}, L={L}, Lc={Lc})")
    if split == "fixed":
        if width is not None and not 1 <= width <= L - F:
            raise ValueError(f"need 1 <= width <= L - F = {L - F} (got {width})")
        if T <= L:
            return L - F, 0
        C, n_mid = width or L - F, 0
        while F + (n_mid + 1) * C + Lc <= T:
            n_mid += 1
        return C, n_mid
    if width is not None:
        raise ValueError("width is the fixed split's middle-chunk width (split='fixed')")
    if split != "dynamic":
        raise ValueError(f"split must be 'dynamic' or 'fixed', got {split!r}")
    X = T - Lc - F
    if T <= L or X <= 0:
        return L - F, 0
    nq, m = X // (L - F), X % (L - F)
    if m < Mmax:
        return L - F, nq
    return X // (nq + 1), nq + 1


def reference_stable_prefix(
    T: int, L: int, F: int, Lc: int, Mmax: int, *, split: str, width: int | None = None
) -> int:
    """Leading tokens whose KV another request sharing them may reuse: with ``fixed``, the
    tokens before the first stair query, counted over the prompt and, for T <= L, the
    generated tokens up to L (all causal there), but for T <= L no further than the end of
    middle chunk 0 of a long prompt, F + C: later tokens of a long prompt sit in middle
    chunk 1 or further and see other keys.  With ``dynamic`` none (0)."""
    if split != "fixed":
        return 0
    p = 0
    while p < max(T, L) and _query_rule(p, T, L, F, Lc, Mmax, split, width)[0] != "stair":
        p += 1
    return min(p, F + (width or L - F)) if T <= L else p


def _query_rule(
    p: int,
    T: int,
    L: int,
    F: int,
    Lc: int,
    Mmax: int,
    split: str = "dynamic",
    width: int | None = None,
) -> tuple[str, int, int]:
    """Rule of query index p: ("causal", 0, 0), ("middle", s_k, 0) or ("stair", n, C)."""
    C, n_mid = reference_split(T, L, F, Lc, Mmax, split=split, width=width)
    if p >= T:  # generated token
        if p + 1 <= L:
            return "causal", 0, 0
        return "stair", p + 1, C
    if T <= L or p < F:
        return "causal", 0, 0
    s_last = F + n_mid * C
    if p < s_last:
        k = (p - F) // C
        return "middle", F + k * C, 0
    return "stair", T, C


def _stair_row(j: torch.Tensor, A: int, E: int) -> torch.Tensor:
    below = torch.div((A - 1 - j).clamp(min=0), E, rounding_mode="floor")
    return torch.where(j >= A, j, A - 1 - below)


def _anchor(n: int, C: int, W: int) -> int:
    """The first index at its own position: n - ((n - 1) mod C), moved down to n - W when the
    tokens from it to n - 1 would be fewer than W."""
    A = n - ((n - 1) % C)
    if n - A < W:
        A = n - W
    return A


@functools.lru_cache(maxsize=65536)
def auto_stair_width(n: int, C: int, L: int, W: int = 0) -> int:
    """The smallest E >= 1 with max_{0 <= k <= p < n} pos(p) - pos(k) <= L - 1 (every query p
    of sequence length n against every key k <= p; anchor ``_anchor(n, C, W)``), found by
    trying E = 1, 2, ... in turn."""
    A = _anchor(n, C, W)
    j = torch.arange(n, dtype=torch.int64)
    for E in range(1, n + 1):
        pos = _stair_row(j, A, E)
        span = int((pos - torch.cummin(pos, 0).values).max())
        if span <= L - 1:
            return E
    raise ValueError(f"no stair width keeps n={n}, C={C} inside L={L}")


def reference_positions(
    T_prompt: int,
    seq_len: int,
    L: int,
    F: int,
    Lc: int,
    Mmax: int,
    E: int | str,
    *,
    split: str = "dynamic",
    width: int | None = None,
    near_window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Allowed keys and positions of every query of one sequence.

    Args: prompt length T_prompt, total tokens seq_len (prompt + generated), training length
    L, first chunk F, last-chunk target Lc, max remainder Mmax, stair width E (an int, or
    "auto": ``auto_stair_width`` per stair query set), chunk plan ``split`` ("dynamic" or
    "fixed", ``reference_split``) with the fixed split's middle-chunk ``width``, and the
    fewest tokens ``near_window`` before n that a stair query set keeps at their own positions.

    Returns ``(mask, qpos, kpos)``: mask bool [seq_len, seq_len], mask[p, j] true when query p
    attends to key j; qpos int64 [seq_len], the query's position; kpos int64
    [seq_len, seq_len], key j's position as seen by query p (0 where mask is false).
    """
    S = seq_len
    j = torch.arange(S, dtype=torch.int64)
    mask = torch.zeros(S, S, dtype=torch.bool)
    kpos = torch.zeros(S, S, dtype=torch.int64)
    qpos = torch.zeros(S, dtype=torch.int64)
    for p in range(S):
        kind, a, b = _query_rule(p, T_prompt, L, F, Lc, Mmax, split, width)
        if kind == "causal":
            row_mask, row_pos, q = j <= p, j.clone(), p
        elif kind == "middle":
            s = a
            row_mask = (j < F) | ((j >= s) & (j <= p))
            row_pos = torch.where(j < F, j, F + (j - s))
            q = F + (p - s)
        else:
            n, C = a, b
            A = _anchor(n, C, near_window)
            e = auto_stair_width(n, C, L, near_window) if E == "auto" else E
            row_pos = _stair_row(j, A, e)
            row_mask = j <= p
            q = int(row_pos[p])
        mask[p] = row_mask
        kpos[p] = torch.where(row_mask, row_pos, torch.zeros_like(row_pos))
        qpos[p] = q
    return mask, qpos, kpos


def query_scales(
    T_prompt: int,
    seq_len: int,
    L: int,
    log_n: bool = True,
    *,
    F: int = 100,
    Lc: int = 512,
    Mmax: int = 200,
    split: str = "dynamic",
    width: int | None = None,
    long_scale: float = 1.0,
) -> torch.Tensor:
    """Query scales, float32 [seq_len]: max(1, ln(p+1)/ln(L)) (log-n; 1 when ``log_n`` is
    false) times ``long_scale`` (``long_query_scale``) for stair queries, 1 for the others.

    Stair queries are the last chunk of a long prompt and generated tokens with p + 1 > L.
    F, Lc and Mmax are needed to tell middle-chunk queries (scale 1) from last-chunk ones.
    """
    out = torch.ones(seq_len, dtype=torch.float32)
    if not log_n and long_scale == 1.0:
        return out
    for p in range(seq_len):
        if _query_rule(p, T_prompt, L, F, Lc, Mmax, split, width)[0] == "stair":
            ln = max(1.0, math.log(p + 1) / math.log(L)) if log_n else 1.0
            out[p] = ln * long_scale
    return out


# ---------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, rope_parameters: dict | None = None) -> torch.Tensor:
    """Inverse frequencies, float32 [rotary_dim // 2], every scaling folded in.

    rotary_dim = int(head_dim * partial_rotary_factor).  rope_type "default": theta^(-2i/d);
    "linear": divided by ``factor`` (same as dividing positions); "llama3": Llama-3.1
    smoothing (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
    """
    rp = dict(DEFAULT_ROPE if rope_parameters is None else rope_parameters)
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    theta = float(rp.get("rope_theta", 10000.0))
    dim = int(head_dim * float(rp.get("partial_rotary_factor", 1.0)))
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv = inv / float(rp["factor"])
    elif rope_type == "llama3":
        factor = float(rp["factor"])
        lo, hi = float(rp["low_freq_factor"]), float(rp["high_freq_factor"])
        old_len = float(rp["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(
            wavelen < old_len / hi, inv, torch.where(wavelen > old_len / lo, inv / factor, smoothed)
        )
    else:
        raise NotImplementedError(f"rope_type {rope_type!r}: supported default, linear, llama3")
    return inv.to(torch.float32)


def rope_angles(
    positions: torch.Tensor, inv_freq: torch.Tensor, rope_parameters: dict | None = None
) -> torch.Tensor:
    """Rotation angles, float64 [*positions.shape, R/2] = positions * inv_freq.

    positions: integer tensor of any shape; inv_freq: float [R/2] from ``rope_inv_freq``.
    ``rope_parameters`` is accepted for uniform call sites only: every supported scaling is
    already folded into ``inv_freq`` (transformers' convention), so it does not change angles.
    Callers rebase positions (subtract a common base) to keep angles small; only differences
    between a query's and its keys' positions matter.
    """
    del rope_parameters
    return positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate x (neox / rotate_half style, like HF Llama) by ``angles``.

    x: float [..., D]; angles: float64 [..., R/2], broadcastable to x's leading dims, R <= D.
    Dims [0, R/2) pair with [R/2, R); dims [R, D) pass through.  Returns x's dtype and shape.
    """
    half = angles.shape[-1]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return torch.cat((r1, r2, rest.expand(*r1.shape[:-1], rest.shape[-1])), dim=-1)


# ---------------------------------------------------------------- attention


def mesa_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    T_prompt: int,
    L: int,
    F: int = 100,
    Lc: int = 512,
    Mmax: int = 200,
    E: int | str = 50,
    log_n: bool = True,
    rope_parameters: dict | None = None,
    scale: float | None = None,
    pos_offset: int = 0,
    block: int = 128,
    split: str = "dynamic",
    width: int | None = None,
    near_window: int = 0,
    long_scale: float = 1.0,
) -> torch.Tensor:
    """Mesa attention of one sequence, dense (chunk plan ``split`` with the fixed split's
    middle-chunk ``width``, ``reference_split``; stair anchors with ``near_window``).

    q: [S, Hq, D]; k, v: [S, Hkv, D] (Hq a multiple of Hkv; query head h reads KV head
    h // (Hq // Hkv)), any float dtype, NOT rotated.  S = prompt + generated tokens; the
    first ``T_prompt`` are the prompt.  Each query p is rotated at qpos[p] and each key j at
    kpos[p, j] (per-query key positions from ``reference_positions``), q is multiplied by its
    scale (``query_scales``: log-n times ``long_scale`` for stair queries), softmax runs over
    the allowed keys with ``scale`` (default D ** -0.5).
    ``pos_offset`` is added to every position before rotation (only differences matter).
    Computes in float32 with float64 angles.  Returns [S, Hq, D] in q's dtype.

    Speed only: queries are processed in blocks of up to ``block`` rows, and a block's keys
    are rotated once when the block's ``kpos`` rows agree on every allowed key (checked on
    the tensors; otherwise the block is halved, down to single rows).  ``block=1`` is the
    literal per-query computation.
    """
    S, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    assert Hq == G * Hkv and k.shape == (S, Hkv, D) and v.shape == k.shape
    scale = D**-0.5 if scale is None else scale
    mask, qpos, kpos = reference_positions(
        T_prompt, S, L, F, Lc, Mmax, E, split=split, width=width, near_window=near_window
    )
    qs = query_scales(
        T_prompt, S, L, log_n, F=F, Lc=Lc, Mmax=Mmax, split=split, width=width,
        long_scale=long_scale,
    )  # fmt: skip
    inv_freq = rope_inv_freq(D, rope_parameters)
    qf = q.float() * qs[:, None, None]
    kf, vf = k.float(), v.float()
    out = torch.full((S, Hq, D), float("nan"), dtype=torch.float32)

    def attend(p0: int, p1: int) -> None:
        m, rows = mask[p0:p1, :p1], kpos[p0:p1, :p1]  # every rule only reads keys j <= p
        kp = torch.where(m, rows, -1).amax(dim=0)  # [K]: the block's common key positions
        if p1 - p0 > 1 and not bool(((rows == kp) | ~m).all()):
            mid = (p0 + p1) // 2
            attend(p0, mid)
            attend(mid, p1)
            return
        q_rot = apply_rope(qf[p0:p1], rope_angles(qpos[p0:p1, None] + pos_offset, inv_freq))
        k_rot = apply_rope(kf[:p1], rope_angles(kp[:, None] + pos_offset, inv_freq))
        scores = torch.einsum("bhgd,khd->bhgk", q_rot.view(-1, Hkv, G, D), k_rot) * scale
        probs = torch.softmax(scores.masked_fill(~m[:, None, None, :], float("-inf")), dim=-1)
        out[p0:p1] = torch.einsum("bhgk,khd->bhgd", probs, vf[:p1]).reshape(-1, Hq, D)

    for p0 in range(0, S, block):
        attend(p0, min(S, p0 + block))
    return out.to(q.dtype)


def causal_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope_parameters: dict | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain causal RoPE attention (positions 0..S-1), the stock behaviour.

    q: [S, Hq, D]; k, v: [S, Hkv, D], not rotated.  Returns [S, Hq, D] in q's dtype,
    computed in float32.
    """
    S, Hq, D = q.shape
    G = Hq // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    ang = rope_angles(torch.arange(S)[:, None], rope_inv_freq(D, rope_parameters))
    qr, kr = apply_rope(q.float(), ang), apply_rope(k.float(), ang)
    kr, vf = kr.repeat_interleave(G, dim=1), v.float().repeat_interleave(G, dim=1)
    scores = torch.einsum("phd,jhd->hpj", qr, kr) * scale
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return torch.einsum("hpj,jhd->phd", probs, vf).to(q.dtype)
