"""Needle probe: where the answer-producing queries of a passkey prompt put their attention.

    .venv/bin/python benchmarks/needle_probe.py --length 0.9 --depth 0.5 --config causal
    .venv/bin/python benchmarks/needle_probe.py --length 1.5 --depth 0.5 \\
        --config mesa --config mesa:E=2 --config mesa:log_n=0 --json out.json
    .venv/bin/python benchmarks/needle_probe.py --summarize a.json b.json

A compact plain-torch Llama forward (float32, CPU or CUDA) of a HF checkpoint (default: the
converted SmolLM2-135M-Instruct).  Every layer's attention follows the dense Mesa contract:
masks, query/key positions and log-n scales come from ``mesa_vllm.testing.reference``
(``reference_positions``, ``query_scales``, the rope helpers), computed over the allowed keys
only, in blocks of rows that share key positions.  Prefill runs the prompt; then a KV cache
decodes (a) the true answer " <key>" teacher-forced and (b) greedily ``--new-tokens``.

Recorded rows: the last prompt token (predicts " ") and the teacher-forced rows that predict
the key's digits.  For each recorded row, layer and query head the softmax over all keys is
reduced to masses on: ``key`` (the key's digit tokens, both occurrences), ``sent`` (the rest
of the key sentence), ``first`` (keys [0, F)), ``near`` (keys at or after the anchor A of a
stair row; for causal rows the last Lc prompt tokens), ``rest``.  Also the relative distances
(query position - key position) at which the key's digits sit as seen from that row.

A config is ``causal`` (plain RoPE, positions = indices) or ``mesa[:k=v,...]`` with keys
L (train length used by the Mesa rules), F, Lc, Mmax, E, log_n (0/1), split, C, W, s (see
``parse_config``); unset keys take the --train-len/--first-chunk/... flags.
``--compare-prefix`` also runs plain causal attention on the prompt cut just after the key
sentence (must fit in the model's L) and reports the cosine between the key tokens' residual
streams there and in each config's run, per layer.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mesa_vllm.plan import MesaParams, stair_anchor
from mesa_vllm.testing.reference import (
    query_scales,
    reference_positions,
    reference_split,
    rope_angles,
    rope_inv_freq,
)

CATS = ("key", "sent", "first", "near", "rest")


# ---------------------------------------------------------------- model


@dataclass
class Model:
    cfg: dict
    W: dict[str, torch.Tensor]
    device: torch.device

    @property
    def n_layers(self) -> int:
        return self.cfg["num_hidden_layers"]

    @property
    def Hq(self) -> int:
        return self.cfg["num_attention_heads"]

    @property
    def Hkv(self) -> int:
        return self.cfg.get("num_key_value_heads") or self.Hq

    @property
    def D(self) -> int:
        return self.cfg.get("head_dim") or self.cfg["hidden_size"] // self.Hq

    @property
    def train_len(self) -> int:
        c = self.cfg
        return int(c.get("original_max_position_embeddings") or c["max_position_embeddings"])

    @property
    def rope(self) -> dict:
        rp = dict(self.cfg.get("rope_parameters") or {})
        if not rp:
            rp = dict(self.cfg.get("rope_scaling") or {})
            rp.setdefault("rope_theta", self.cfg.get("rope_theta", 10000.0))
        if "type" in rp and "rope_type" not in rp:
            rp["rope_type"] = rp.pop("type")
        rp.setdefault("rope_type", "default")
        rp.setdefault("partial_rotary_factor", self.cfg.get("partial_rotary_factor", 1.0))
        return rp


def load_model(model_dir: str | Path, device: str = "cpu") -> Model:
    """config.json + model.safetensors of a Llama-family checkpoint, weights float32."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    cfg = json.loads((d / "config.json").read_text())
    if cfg["architectures"][0] not in (
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
    ):
        raise NotImplementedError(cfg["architectures"][0])
    dev = torch.device(device)
    W = {k: v.to(dev, torch.float32) for k, v in load_file(str(d / "model.safetensors")).items()}
    return Model(cfg, W, dev)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _lin(x: torch.Tensor, W: dict, name: str) -> torch.Tensor:
    y = x @ W[f"{name}.weight"].T
    b = W.get(f"{name}.bias")
    return y if b is None else y + b


# ---------------------------------------------------------------- attention plan


# the product's defaults (mesa_vllm.plan.MesaParams), not a copy of them
PAPER = MesaParams(train_len=8192)


@dataclass
class MesaCfg:
    name: str
    mesa: bool
    L: int = PAPER.train_len
    F: int = PAPER.first_chunk
    Lc: int = PAPER.last_chunk
    Mmax: int = PAPER.max_remainder
    E: int | str = PAPER.stair_width  # or "auto"
    log_n: bool = PAPER.log_n_scaling
    split: str = PAPER.split
    C: int | None = PAPER.middle_chunk  # the fixed split's middle-chunk width
    W: int = PAPER.near_window
    s: float = 1.0  # long_query_scale


def parse_config(spec: str, defaults: MesaCfg) -> MesaCfg:
    """``causal`` or ``mesa[:k=v,...]`` (keys L, F, Lc, Mmax, E (an int or ``auto``), log_n,
    split, C = the fixed split's middle_chunk, W = near_window, s = long_query_scale)."""
    kind, _, rest = spec.partition(":")
    if kind not in ("causal", "mesa"):
        raise ValueError(f"config {spec!r}: causal or mesa[:k=v,...]")
    c = MesaCfg(
        spec,
        kind == "mesa",
        defaults.L,
        defaults.F,
        defaults.Lc,
        defaults.Mmax,
        defaults.E,
        defaults.log_n,
    )
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        if k not in ("L", "F", "Lc", "Mmax", "E", "log_n", "split", "C", "W", "s"):
            raise ValueError(f"config {spec!r}: unknown key {k!r}")
        if k == "log_n":
            value: object = bool(int(v))
        elif k == "s":
            value = float(v)
        elif k == "split" or (k == "E" and v == "auto"):
            value = v
        else:
            value = int(v)
        setattr(c, k, value)
    return c


@dataclass
class Block:
    """Query rows [p0, p1) sharing key positions: keys ``cols`` at positions ``kp``, allowed
    where ``m`` [p1 - p0, len(cols)]; query positions ``qpos`` and log-n scales ``qs``."""

    p0: int
    p1: int
    cols: torch.Tensor
    kp: torch.Tensor
    m: torch.Tensor
    qpos: torch.Tensor
    qs: torch.Tensor


@dataclass
class Plan:
    T: int
    S: int
    prefill: list[Block]
    decode: dict[int, Block]  # one single-row block per generated index p >= T
    anchors: dict[int, int]  # stair rows: p -> A; other recorded rows absent
    kpos_rows: dict[int, torch.Tensor]  # recorded rows: key positions [p + 1]
    qpos_rows: dict[int, int]
    max_pos: int


def _blocks(mask, qpos, kpos, qs, lo: int, hi: int, block: int) -> list[Block]:
    out = []

    def add(p0: int, p1: int) -> None:
        m = mask[p0:p1, :p1]
        cols = m.any(0).nonzero().squeeze(1)
        mc, rows = m[:, cols], kpos[p0:p1, :p1][:, cols]
        kp = torch.where(mc, rows, -1).amax(0)
        if p1 - p0 > 1 and not bool(((rows == kp) | ~mc).all()):
            mid = (p0 + p1) // 2
            add(p0, mid)
            add(mid, p1)
            return
        out.append(Block(p0, p1, cols, kp, mc, qpos[p0:p1].clone(), qs[p0:p1].clone()))

    for p0 in range(lo, hi, block):
        add(p0, min(hi, p0 + block))
    return out


def make_plan(c: MesaCfg, T: int, S: int, record: list[int], block: int = 256) -> Plan:
    """Blocks of every query row of a sequence of S tokens (T prompt) under config ``c``."""
    if c.mesa:
        plan_kw = {"split": c.split, "width": c.C}
        mask, qpos, kpos = reference_positions(
            T, S, c.L, c.F, c.Lc, c.Mmax, c.E, **plan_kw, near_window=c.W
        )
        qs = query_scales(
            T, S, c.L, c.log_n, F=c.F, Lc=c.Lc, Mmax=c.Mmax, **plan_kw, long_scale=c.s
        )
        C, n_mid = reference_split(T, c.L, c.F, c.Lc, c.Mmax, **plan_kw)
        cuts = {0, T}
        if T > c.L:
            cuts |= {c.F} | {c.F + k * C for k in range(n_mid + 1)}
        cuts = sorted(x for x in cuts if 0 <= x <= T)
        prefill = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            prefill += _blocks(mask, qpos, kpos, qs, a, b, block)
        decode = {p: _blocks(mask, qpos, kpos, qs, p, p + 1, 1)[0] for p in range(T, S)}
        anchors = {}
        for p in record:
            n = T if p < T else p + 1
            if (p < T and T > c.L and p >= c.F + n_mid * C) or (p >= T and n > c.L):
                anchors[p] = stair_anchor(n, C, c.W)
        kpos_rows = {p: kpos[p, : p + 1].clone() for p in record}
        qpos_rows = {p: int(qpos[p]) for p in record}
        max_pos = int(kpos.max()) if S else 0
        del mask, kpos
    else:
        idx = torch.arange(S)
        ones = torch.ones(S)
        prefill = []
        for p0 in range(0, T, block):
            p1 = min(T, p0 + block)
            m = idx[:p1][None, :] <= idx[p0:p1, None]
            prefill.append(Block(p0, p1, idx[:p1], idx[:p1], m, idx[p0:p1], ones[p0:p1]))
        decode = {
            p: Block(
                p,
                p + 1,
                idx[: p + 1],
                idx[: p + 1],
                torch.ones(1, p + 1, dtype=torch.bool),
                idx[p : p + 1],
                ones[p : p + 1],
            )
            for p in range(T, S)
        }
        anchors, kpos_rows = {}, {p: idx[: p + 1].clone() for p in record}
        qpos_rows, max_pos = {p: p for p in record}, S
    return Plan(T, S, prefill, decode, anchors, kpos_rows, qpos_rows, max(max_pos, S))


def _to(b: Block, dev: torch.device) -> Block:
    return Block(b.p0, b.p1, *(t.to(dev) for t in (b.cols, b.kp, b.m, b.qpos, b.qs)))


# ---------------------------------------------------------------- forward


class Runner:
    """Prefill + KV-cache decode of one sequence under one plan, recording attention rows."""

    def __init__(self, model: Model, plan: Plan, record: list[int], capture: list[int] = ()):
        self.m, self.plan = model, plan
        dev = model.device
        self.prefill = [_to(b, dev) for b in plan.prefill]
        self.decode = {p: _to(b, dev) for p, b in plan.decode.items()}
        inv = rope_inv_freq(model.D, model.rope)
        ang = rope_angles(torch.arange(plan.max_pos + 1), inv, model.rope)
        self.cos, self.sin = ang.cos().float().to(dev), ang.sin().float().to(dev)
        self.record = set(record)
        self.probs: dict[int, list[torch.Tensor]] = {p: [] for p in record}  # p -> [layer] [Hq,p+1]
        self.capture = torch.tensor(sorted(capture), dtype=torch.long)
        self.hidden: list[torch.Tensor] = []  # [layer] residual stream at ``capture`` [n, H]
        Hkv, D, S = model.Hkv, model.D, plan.S
        self.K = [torch.zeros(S, Hkv, D, device=dev) for _ in range(model.n_layers)]
        self.V = [torch.zeros(S, Hkv, D, device=dev) for _ in range(model.n_layers)]
        self.n_layers = model.n_layers

    def _rot(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """apply_rope at integer positions via float64-built tables (same values)."""
        half = self.cos.shape[-1]
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)

    def _attend(self, li: int, q: torch.Tensor, b: Block) -> torch.Tensor:
        """q [B, Hq, D] (not rotated) of rows b.p0..b.p1 -> [B, Hq, D]."""
        Hq, Hkv, D = self.m.Hq, self.m.Hkv, self.m.D
        G, B = Hq // Hkv, q.shape[0]
        qr = self._rot(q * b.qs[:, None, None], b.qpos)
        kr = self._rot(self.K[li][b.cols], b.kp)
        v = self.V[li][b.cols]
        qh = qr.view(B, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * B, D)
        sc = (qh @ kr.permute(1, 2, 0)).view(Hkv, G, B, -1) * D**-0.5
        pr = torch.softmax(sc.masked_fill(~b.m[None, None], float("-inf")), dim=-1)
        for p in self.record:
            if b.p0 <= p < b.p1:
                row = torch.zeros(Hq, p + 1, device=q.device)
                row[:, b.cols] = pr[:, :, p - b.p0].reshape(Hq, -1)
                self.probs[p].append(row.cpu())
        o = pr.reshape(Hkv, G * B, -1) @ v.permute(1, 0, 2)
        return o.view(Hkv, G, B, D).permute(2, 0, 1, 3).reshape(B, Hq, D)

    def _layers(self, x: torch.Tensor, p0: int, blocks: list[Block], progress=None):
        W, cfg = self.m.W, self.m.cfg
        eps, Hq, Hkv, D = cfg["rms_norm_eps"], self.m.Hq, self.m.Hkv, self.m.D
        n = x.shape[0]
        cap = None
        if p0 == 0 and len(self.capture):
            cap = self.capture.to(x.device)
        for li in range(self.n_layers):
            pre = f"model.layers.{li}"
            h = _rms(x, W[f"{pre}.input_layernorm.weight"], eps)
            q = _lin(h, W, f"{pre}.self_attn.q_proj").view(n, Hq, D)
            self.K[li][p0 : p0 + n] = _lin(h, W, f"{pre}.self_attn.k_proj").view(n, Hkv, D)
            self.V[li][p0 : p0 + n] = _lin(h, W, f"{pre}.self_attn.v_proj").view(n, Hkv, D)
            a = torch.cat([self._attend(li, q[b.p0 - p0 : b.p1 - p0], b) for b in blocks])
            x = x + _lin(a.reshape(n, Hq * D), W, f"{pre}.self_attn.o_proj")
            h = _rms(x, W[f"{pre}.post_attention_layernorm.weight"], eps)
            g, u = _lin(h, W, f"{pre}.mlp.gate_proj"), _lin(h, W, f"{pre}.mlp.up_proj")
            x = x + _lin(torch.nn.functional.silu(g) * u, W, f"{pre}.mlp.down_proj")
            if cap is not None:
                self.hidden.append(x[cap].cpu())
            if progress:
                progress(li + 1)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        W = self.m.W
        x = _rms(x, W["model.norm.weight"], self.m.cfg["rms_norm_eps"])
        return x @ W.get("lm_head.weight", W["model.embed_tokens.weight"]).T

    def run_prefill(self, ids: list[int], all_logits: bool = False, progress=None) -> torch.Tensor:
        """Logits of the last prompt row [vocab] (or every row [T, vocab])."""
        emb = self.m.W["model.embed_tokens.weight"]
        x = emb[torch.tensor(ids, dtype=torch.long, device=self.m.device)]
        x = self._layers(x, 0, self.prefill, progress)
        return self._logits(x if all_logits else x[-1:]).squeeze(0).cpu()

    def step(self, tok: int, p: int) -> torch.Tensor:
        """Decode token ``tok`` at index p (>= T) with the cache; logits [vocab]."""
        emb = self.m.W["model.embed_tokens.weight"]
        x = emb[torch.tensor([tok], device=self.m.device)]
        return self._logits(self._layers(x, p, [self.decode[p]]))[0].cpu()


def forward_logits(model: Model, ids: list[int], c: MesaCfg, prompt_len: int | None = None):
    """Logits [S, vocab] of every position of ``ids`` (prompt = first ``prompt_len``; the rest
    decoded through the cache as generated tokens).  For tests against the dense oracle."""
    T = len(ids) if prompt_len is None else prompt_len
    r = Runner(model, make_plan(c, T, len(ids), []), [])
    out = [r.run_prefill(ids[:T], all_logits=True)]
    for p in range(T, len(ids)):
        out.append(r.step(ids[p], p)[None])
    return torch.cat(out)


# ---------------------------------------------------------------- prompt and reductions


@dataclass
class Prompt:
    ids: list[int]
    key: str
    answer_ids: list[int]
    key_idx: list[int]  # digit tokens of every key occurrence
    sent_span: tuple[int, int]  # [start, end) of the key sentence
    depth: float


def _find_all(ids: list[int], sub: list[int]) -> list[int]:
    n = len(sub)
    return [i for i in range(len(ids) - n + 1) if ids[i : i + n] == sub]


def build_prompt(
    tok, n_tokens: int, depth: float, seed: int, task: str = "passkey", index: int | None = None
) -> Prompt:
    """The harness's passkey (or, ``task="needle"``, needle) prompt of about n_tokens.
    ``index``: the needle prompt the eval harness sends as sample ``index`` of that length,
    depth and seed (its own seeding), instead of ``random.Random(seed)``."""
    from mesa_vllm.eval import data, harness

    rng = random.Random(seed)
    if task == "needle":
        if index is not None:
            rng = harness._rng(seed, "needle", n_tokens, depth, index)
        s = data.needle_sample(tok, n_tokens, depth, rng=rng)
        sent = data.NEEDLE_SENTENCE.format(key=s.answer)
    else:
        s = data.passkey_sample(tok, n_tokens, depth=depth, rng=rng)
        sent = data.KEY_SENTENCE.format(key=s.answer)
    ids = tok.encode(s.prompt)
    digits = tok.encode(s.answer, add_special_tokens=False)
    starts = _find_all(ids, digits)
    if not starts:
        raise RuntimeError("key tokens not found in the prompt")
    key_idx = [i + k for i in starts for k in range(len(digits))]
    enc = tok(s.prompt, return_offsets_mapping=True)
    c0 = s.prompt.index(sent)
    c1 = c0 + len(sent)
    toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > c0 and a < c1]
    return Prompt(
        ids,
        s.answer,
        tok.encode(" " + s.answer, add_special_tokens=False),
        key_idx,
        (toks[0], toks[-1] + 1),
        depth,
    )


def reduce_row(probs: torch.Tensor, p: int, T: int, pr: Prompt, c: MesaCfg, anchor: int | None):
    """probs [Hq, p+1] -> masses [Hq, 5] in CATS order."""
    n = p + 1
    cat = torch.full((n,), 4, dtype=torch.long)  # rest
    near_lo = anchor if anchor is not None else max(0, T - c.Lc)
    cat[near_lo:] = 3
    cat[: min(c.F, n)] = 2
    s0, s1 = pr.sent_span
    cat[s0:s1] = 1
    cat[torch.tensor(pr.key_idx)] = 0
    out = torch.zeros(probs.shape[0], 5, dtype=torch.float64)
    out.index_add_(1, cat, probs.double())
    return out


# ---------------------------------------------------------------- one config


def run_config(model: Model, tok, pr: Prompt, c: MesaCfg, new_tokens: int, capture=()) -> dict:
    T = len(pr.ids)
    ans = pr.answer_ids
    S = T + max(new_tokens, len(ans))
    rec = [T - 1] + [T + i for i in range(len(ans) - 1)]  # rows predicting ans[0], ans[1], ...
    t0 = time.time()
    plan = make_plan(c, T, S, rec)
    t_plan = time.time() - t0
    r = Runner(model, plan, rec, capture)

    def progress(i: int) -> None:
        print(
            f"  [{c.name}] layer {i}/{r.n_layers}  {time.time() - t0:.0f}s",
            file=sys.stderr,
            flush=True,
        )

    with torch.inference_mode():
        last = r.run_prefill(pr.ids, progress=progress)
        t_prefill = time.time() - t0
        # teacher-forced answer: log p(ans[i] | prefix)
        lps, argm, logits = [], [], last
        for i, t in enumerate(ans):
            lp = torch.log_softmax(logits.double(), -1)
            lps.append(float(lp[t]))
            argm.append(int(logits.argmax()))
            if i + 1 < len(ans):
                logits = r.step(t, T + i)
        probs = {p: torch.stack(r.probs[p]) for p in rec}  # [layers, Hq, p+1]
        # greedy
        r.record = set()
        gen, logits = [], last
        for i in range(new_tokens):
            t = int(logits.argmax())
            gen.append(t)
            if i + 1 < new_tokens:
                logits = r.step(t, T + i)
    from mesa_vllm.eval import data

    text = tok.decode(gen)
    masses, dist = [], []
    key_idx = torch.tensor(pr.key_idx)
    for p in rec:
        A = plan.anchors.get(p)
        masses.append(
            torch.stack(
                [reduce_row(probs[p][li], p, T, pr, c, A) for li in range(r.n_layers)]
            ).tolist()
        )
        dist.append((plan.qpos_rows[p] - plan.kpos_rows[p][key_idx]).tolist())
    top = {}
    for j, p in enumerate(rec):  # the 5 most attended keys of each layer's best key head
        rows = []
        for li in range(r.n_layers):
            h = max(range(model.Hq), key=lambda h, li=li, j=j: masses[j][li][h][0])
            v, ix = probs[p][li, h].topk(5)
            rows.append(
                {
                    "head": h,
                    "keys": ix.tolist(),
                    "probs": v.tolist(),
                    "tokens": [tok.decode([pr.ids[i] if i < T else ans[i - T]]) for i in ix],
                }
            )
        top[str(p)] = rows
    return {
        "config": asdict(c),
        "T": T,
        "rows": rec,
        "anchors": {str(p): a for p, a in plan.anchors.items()},
        "key_distance": dist,
        "max_position": plan.max_pos,
        "max_distance_last_row": int(plan.qpos_rows[T - 1] - plan.kpos_rows[T - 1].min()),
        "masses": masses,  # [row][layer][head][CATS]
        "teacher_logprobs": lps,
        "teacher_argmax": [tok.decode([t]) for t in argm],
        "key_logprob": sum(lps[1:]),
        "greedy_text": text,
        "found": data.score(text, pr.key),
        "top_keys": top,
        "hidden": [h.tolist() for h in r.hidden] if len(r.hidden) else None,
        "seconds": {"plan": t_plan, "prefill": t_prefill, "total": time.time() - t0},
    }


def cosines(a: list, b: list) -> list[float]:
    """Mean cosine over tokens, per layer, of two [layer][token][H] lists."""
    out = []
    for x, y in zip(a, b, strict=True):
        x, y = torch.tensor(x), torch.tensor(y)
        out.append(float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean()))
    return out


# ---------------------------------------------------------------- tables


def _digit_mass(res: dict, li: int, h: int) -> float:
    """Mean key mass over the rows that predict the key's digits (rows 1..)."""
    ms = res["masses"]
    rows = range(1, len(ms)) if len(ms) > 1 else range(len(ms))
    return sum(ms[j][li][h][0] for j in rows) / len(rows)


def table(results: list[dict], n_layers_shown: int = 10) -> str:
    """Markdown: per layer, the baseline's (first result) top key head and each config's mass
    on the key there (digit rows mean / last prompt row), plus each config's best head."""
    base = results[0]
    n_layers, n_heads = len(base["masses"][0]), len(base["masses"][0][0])
    best = [
        max(range(n_heads), key=lambda h, li=li: _digit_mass(base, li, h)) for li in range(n_layers)
    ]
    order = sorted(range(n_layers), key=lambda li: -_digit_mass(base, li, best[li]))
    shown = sorted(order[:n_layers_shown])
    names = [r.get("label", r["config"]["name"]) for r in results]
    lines = [
        "| layer | head | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(results),
    ]
    for li in shown:
        h = best[li]
        cells = []
        for r in results:
            own = max(range(n_heads), key=lambda k, li=li, r=r: _digit_mass(r, li, k))
            cells.append(
                f"{_digit_mass(r, li, h):.3f} / {r['masses'][0][li][h][0]:.3f}"
                f" (h{own}: {_digit_mass(r, li, own):.3f})"
            )
        lines.append(f"| {li} | {h} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| config | T | key dist (last row) | log p(' ') | log p(digits) | greedy | found |",
        "|---|---|---|---|---|---|---|",
    ]
    for r, nm in zip(results, names, strict=True):
        d = r["key_distance"][0]
        lines.append(
            f"| {nm} | {r['T']} | {min(d)}..{max(d)} | {r['teacher_logprobs'][0]:.2f} | "
            f"{r['key_logprob']:.2f} | "
            f"{r['greedy_text']!r} | {r['found']} |"
        )
    return "\n".join(lines)


def mass_table(results: list[dict], heads: list[tuple[int, int]]) -> str:
    """Markdown: for each (layer, head), every config's mass split (CATS) on the last prompt
    row and on the digit rows (mean)."""
    lines = [
        "| config | layer.head | row | " + " | ".join(CATS) + " |",
        "|---|---|---|" + "---|" * len(CATS),
    ]
    for li, h in heads:
        for r in results:
            ms = r["masses"]
            nm = r.get("label", r["config"]["name"])
            dig = [
                sum(ms[j][li][h][c] for j in range(1, len(ms))) / (len(ms) - 1) for c in range(5)
            ]
            for row, vals in (("last", ms[0][li][h]), ("digits", dig)):
                cells = " | ".join(f"{v:.3f}" for v in vals)
                lines.append(f"| {nm} | {li}.{h} | {row} | {cells} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: converted SmolLM2)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--length", type=float, default=0.9, help="prompt length, multiple of L")
    ap.add_argument("--tokens", type=int, default=None, help="prompt length in tokens")
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument(
        "--task",
        default="passkey",
        choices=["passkey", "needle"],
        help="the harness prompt to probe (key: the pass key or the magic number)",
    )
    ap.add_argument(
        "--index",
        type=int,
        default=None,
        help="with --task needle: the eval harness sample INDEX at this length",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", action="append", default=None, help="causal | mesa[:k=v,...]")
    ap.add_argument("--train-len", type=int, default=None, help="L of the Mesa rules")
    ap.add_argument("--first-chunk", type=int, default=PAPER.first_chunk)
    ap.add_argument("--last-chunk", type=int, default=PAPER.last_chunk)
    ap.add_argument("--max-remainder", type=int, default=PAPER.max_remainder)
    ap.add_argument("--stair-width", type=int, default=PAPER.stair_width)
    ap.add_argument("--no-log-n", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="stop after N layers")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--compare-prefix", action="store_true")
    ap.add_argument(
        "--capture-key",
        action="store_true",
        help="cosine of the key sentence's residual stream, each config vs the first",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--summarize", nargs="+", default=None, help="JSON files: print tables")
    ap.add_argument("--split", default=None, help="with --summarize: LAYER.HEAD,... mass splits")
    a = ap.parse_args(argv)

    if a.summarize:
        res = []
        for f in a.summarize:
            d = json.loads(Path(f).read_text())
            for r in d["results"]:
                r["label"] = f"{Path(f).stem}:{r['config']['name']}"
                res.append(r)
        print(table(res))
        if a.split:
            heads = [tuple(int(x) for x in lh.split(".")) for lh in a.split.split(",")]
            print()
            print(mass_table(res, heads))
        return 0

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda":  # float32 means float32: no TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if a.model is None:
        from mesa_vllm.testing.real_models import smollm2

        a.model = str(smollm2())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    model = load_model(a.model, a.device)
    if a.layers:
        model.cfg = {**model.cfg, "num_hidden_layers": a.layers}
    L0 = model.train_len
    defaults = MesaCfg(
        "defaults",
        True,
        a.train_len or L0,
        a.first_chunk,
        a.last_chunk,
        a.max_remainder,
        a.stair_width,
        not a.no_log_n,
    )
    n_tok = a.tokens or int(round(a.length * L0))
    pr = build_prompt(tok, n_tok, a.depth, a.seed, a.task, a.index)
    T = len(pr.ids)
    specs = a.config or (["causal"] if T <= L0 else ["mesa"])
    cfgs = [parse_config(s, defaults) for s in specs]
    print(
        f"prompt: {T} tokens ({T / L0:.2f} L), key {pr.key} at depth {a.depth}: digit tokens "
        f"{pr.key_idx[0]}..{pr.key_idx[-1]}, sentence {pr.sent_span}; "
        f"{model.n_layers} layers on {a.device}, {torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    capture = list(range(*pr.sent_span)) if a.compare_prefix or a.capture_key else []
    out = {
        "model": a.model,
        "T": T,
        "L": L0,
        "key": pr.key,
        "depth": a.depth,
        "seed": a.seed,
        "task": a.task,
        "index": a.index,
        "key_idx": pr.key_idx,
        "sent_span": pr.sent_span,
        "argv": sys.argv[1:],
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": a.device,
        "results": [],
    }
    for c in cfgs:
        if not c.mesa and T > L0:
            print(f"warning: {c.name} at T={T} > L={L0}: stock RoPE past L", file=sys.stderr)
        res = run_config(model, tok, pr, c, a.new_tokens, capture)
        print(
            f"  [{c.name}] {res['seconds']['total']:.0f}s: greedy {res['greedy_text']!r} "
            f"found={res['found']} log p(key)={res['key_logprob']:.2f}",
            file=sys.stderr,
        )
        out["results"].append(res)
    if a.capture_key and len(out["results"]) > 1:
        first = out["results"][0]
        out["hidden_cosine_vs_first"] = {
            res["config"]["name"]: cosines(res["hidden"], first["hidden"])
            for res in out["results"][1:]
        }
        print(f"\nresidual-stream cosine of the key sentence tokens vs {first['config']['name']}")
        for nm, cs in out["hidden_cosine_vs_first"].items():
            print(f"  {nm}: " + " ".join(f"{x:.3f}" for x in cs))
    if a.compare_prefix:
        cut = pr.sent_span[1]
        if cut > L0:
            raise SystemExit(f"--compare-prefix: key sentence ends at {cut} > L")
        ref = MesaCfg("prefix-causal", False)
        sub = Prompt(pr.ids[:cut], pr.key, pr.answer_ids, pr.key_idx, pr.sent_span, pr.depth)
        r = Runner(model, make_plan(ref, cut, cut, [cut - 1]), [], capture)
        with torch.inference_mode():
            r.run_prefill(sub.ids)
        out["prefix_hidden_cosine"] = {
            res["config"]["name"]: cosines(res["hidden"], [h.tolist() for h in r.hidden])
            for res in out["results"]
        }
        print(
            "\nresidual-stream cosine of the key sentence tokens vs a plain causal run of "
            f"the prompt cut at {cut}, per layer:"
        )
        for nm, cs in out["prefix_hidden_cosine"].items():
            print(f"  {nm}: " + " ".join(f"{x:.3f}" for x in cs))
    for res in out["results"]:
        res["hidden"] = None
    if a.json:
        Path(a.json).write_text(json.dumps(out))
    print()
    print(
        f"T = {T} ({T / L0:.2f} L), key {pr.key}, depth {a.depth}; cells: key mass of the "
        "baseline's top head, digit rows mean / last prompt row (config's own best head)"
    )
    print()
    print(table(out["results"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
