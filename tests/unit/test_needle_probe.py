"""benchmarks/needle_probe.py: its forward equals the dense oracle (plain causal and Mesa past
L, prompt and generated rows), and its recorded attention rows are true softmax rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from oracle import dense_model_logits

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import needle_probe as npb  # noqa: E402

from mesa_vllm.testing.cases import MESA_SMALL  # noqa: E402
from mesa_vllm.testing.reference import (  # noqa: E402
    apply_rope,
    query_scales,
    reference_positions,
    reference_split,
    rope_angles,
    rope_inv_freq,
)

pytestmark = pytest.mark.unit

# past L = 64: first chunk, two middle chunks, a last chunk; generated rows are stair rows
MESA = npb.MesaCfg("mesa", True, L=64, F=8, Lc=24, Mmax=10, E=4, log_n=True)
MESA_ORACLE = {**MESA_SMALL, "log_n_scaling": True}


def _ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def model(tiny_llama):
    return npb.load_model(tiny_llama)


def test_mesa_config_matches_cases():
    assert (MESA.L, MESA.F, MESA.Lc, MESA.Mmax, MESA.E) == (
        MESA_SMALL["train_len"],
        MESA_SMALL["first_chunk"],
        MESA_SMALL["last_chunk"],
        MESA_SMALL["max_remainder"],
        MESA_SMALL["stair_width"],
    )


def test_causal_forward_equals_oracle(model, tiny_llama):
    ids = _ids(50)
    want = dense_model_logits(tiny_llama, ids)
    got = npb.forward_logits(model, ids, npb.MesaCfg("causal", False), prompt_len=44)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("T,S", [(150, 156), (64, 75)])
def test_mesa_forward_equals_oracle(model, tiny_llama, T, S):
    ids = _ids(S, seed=T)
    want = dense_model_logits(tiny_llama, ids, mesa=MESA_ORACLE, prompt_len=T)
    got = npb.forward_logits(model, ids, MESA, prompt_len=T)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    # and Mesa past L is not plain causal (the test can tell them apart)
    causal = npb.forward_logits(model, ids, npb.MesaCfg("causal", False), prompt_len=T)
    assert (causal[-1] - want[-1]).abs().max() > 1e-2


def test_block_plan_rows_share_positions():
    T, S = 150, 154
    plan = npb.make_plan(MESA, T, S, [T - 1], block=32)
    mask, qpos, kpos = reference_positions(T, S, MESA.L, MESA.F, MESA.Lc, MESA.Mmax, MESA.E)
    seen = torch.zeros(S, dtype=torch.long)
    for b in [*plan.prefill, *plan.decode.values()]:
        seen[b.p0 : b.p1] += 1
        full = torch.zeros(b.p1 - b.p0, S, dtype=torch.bool)
        full[:, b.cols] = b.m
        assert torch.equal(full, mask[b.p0 : b.p1])
        sub = kpos[b.p0 : b.p1][:, b.cols]
        assert bool(((sub == b.kp) | ~b.m).all())
        assert torch.equal(b.qpos, qpos[b.p0 : b.p1])
    assert bool((seen == 1).all())
    C, n_mid = reference_split(T, MESA.L, MESA.F, MESA.Lc, MESA.Mmax)
    assert (C, n_mid) == (56, 2)
    assert plan.anchors[T - 1] == T - ((T - 1) % C) == 113


def test_recorded_rows_are_softmax(model, tiny_llama):
    T, S = 150, 152
    ids = _ids(S, seed=3)
    rec = [T - 1, T]
    plan = npb.make_plan(MESA, T, S, rec)
    r = npb.Runner(model, plan, rec, capture=list(range(T)))
    with torch.inference_mode():
        r.run_prefill(ids[:T])
        r.step(ids[T], T)
    for p in rec:
        probs = torch.stack(r.probs[p])  # [layers, Hq, p + 1]
        assert probs.shape == (model.n_layers, model.Hq, p + 1)
        torch.testing.assert_close(probs.sum(-1), torch.ones(model.n_layers, model.Hq))
    # layer 1, last prompt row, recomputed from the layer-0 output with the reference helpers
    cfg, W, D = model.cfg, model.W, model.D
    x = r.hidden[0]  # residual stream after layer 0 [T, H]
    h = npb._rms(x, W["model.layers.1.input_layernorm.weight"], cfg["rms_norm_eps"])
    q = (h @ W["model.layers.1.self_attn.q_proj.weight"].T).view(T, model.Hq, D)
    k = (h @ W["model.layers.1.self_attn.k_proj.weight"].T).view(T, model.Hkv, D)
    mask, qpos, kpos = reference_positions(T, T, MESA.L, MESA.F, MESA.Lc, MESA.Mmax, MESA.E)
    qs = query_scales(T, T, MESA.L, True, F=MESA.F, Lc=MESA.Lc, Mmax=MESA.Mmax)
    inv = rope_inv_freq(D, model.rope)
    p = T - 1
    qr = apply_rope(q[p] * qs[p], rope_angles(qpos[p : p + 1], inv))  # [Hq, D]
    kr = apply_rope(k, rope_angles(kpos[p][:, None], inv))  # [T, Hkv, D]
    G = model.Hq // model.Hkv
    sc = torch.einsum("hd,khd->hk", qr, kr.repeat_interleave(G, dim=1)) * D**-0.5
    want = torch.softmax(sc.masked_fill(~mask[p][None], float("-inf")), -1)
    torch.testing.assert_close(r.probs[p][1], want, atol=1e-5, rtol=1e-4)
    assert qs[p] > 1  # the log-n scale is really in play


def test_reduce_row_partitions_mass():
    pr = npb.Prompt(
        list(range(40)), "12", [9, 1, 2], key_idx=[20, 21, 30, 31], sent_span=(18, 33), depth=0.5
    )
    c = npb.MesaCfg("m", True, L=16, F=4, Lc=8)
    probs = torch.softmax(torch.randn(3, 40), -1)
    m = npb.reduce_row(probs, 39, 40, pr, c, anchor=35)
    torch.testing.assert_close(m.sum(-1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(m[:, 0], probs[:, [20, 21, 30, 31]].sum(-1).double())
    torch.testing.assert_close(m[:, 2], probs[:, :4].sum(-1).double())
    torch.testing.assert_close(m[:, 3], probs[:, 35:].sum(-1).double())


def test_needle_prompt_is_the_harness_sample():
    from transformers import AutoTokenizer

    from mesa_vllm.eval import harness
    from mesa_vllm.testing.tokenizer import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    jobs = harness.make_jobs("needle", tok, [400], 3, seed=5, depths=[0.5])
    for j in jobs:
        pr = npb.build_prompt(tok, 400, 0.5, 5, task="needle", index=j.index)
        assert pr.ids == tok.encode(j.prompt) and pr.key == j.key
        # the key's digits, written twice in the needle sentence, inside that sentence's span
        digits = tok.encode(j.key, add_special_tokens=False)
        assert len(pr.key_idx) == 2 * len(digits)
        assert [pr.ids[i] for i in pr.key_idx] == digits * 2
        assert all(pr.sent_span[0] <= i < pr.sent_span[1] for i in pr.key_idx)
    # without an index the probe's own seeding gives another prompt
    assert npb.build_prompt(tok, 400, 0.5, 5, task="needle").key != jobs[0].key


def test_stair_width_auto_parses():
    c = npb.parse_config("mesa:split=fixed,C=16,W=8,E=auto", MESA)
    assert (c.split, c.C, c.W, c.E) == ("fixed", 16, 8, "auto")
    assert npb.parse_config("mesa:E=3", MESA).E == 3


def test_long_query_scale_scales_only_the_stair_rows():
    """s (long_query_scale) multiplies the query scale of the rows past L (the last chunk and
    decode), and leaves the first and middle chunks at theirs."""
    T, S = 200, 204
    base = npb.make_plan(MESA, T, S, record=[])
    hot = npb.make_plan(npb.parse_config("mesa:s=1.5", MESA), T, S, record=[])
    qs0 = torch.cat([b.qs for b in base.prefill] + [base.decode[p].qs for p in range(T, S)])
    qs1 = torch.cat([b.qs for b in hot.prefill] + [hot.decode[p].qs for p in range(T, S)])
    stair = qs0 > 1  # log-n is on in MESA: exactly the stair rows have scale > 1
    assert stair.sum() >= S - T and (~stair).sum() >= MESA.F
    torch.testing.assert_close(qs1[stair], 1.5 * qs0[stair])
    torch.testing.assert_close(qs1[~stair], qs0[~stair])
