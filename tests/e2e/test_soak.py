"""A short soak (issues 7, 19) in the suite: concurrent clients against a real `mesa-vllm serve`
with a KV cache small enough to force preemption; every request kind, the fault phases
(200 dropped streams, a request at exactly max-model-len, a burst, SIGTERM and a restart);
no request without an outcome, no failure, and greedy outputs equal the same requests run
alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_short_soak_with_faults_and_restart(tiny_llama, tmp_path):
    import soak

    # 48 blocks x 16 tokens, one kept aside by vLLM: max-model-len 752.  Two ~330-token
    # prompts fill 42 blocks and their 24-token decodes need more: with 4 clients, mostly
    # long prompts, decodes preempt.
    blocks, mml = 48, 47 * 16
    # drain long enough to finish: a stream still waiting when the drain times out ends with
    # [DONE] and no finish reason (vLLM 0.26 drops the token-less abort chunk), which the soak
    # counts as truncated
    extra = ["--shutdown-timeout", "30"]
    cfg = soak.Config(
        model=str(tiny_llama), clients=4, duration=24, max_tokens=24, train_len=soak.TRAIN_LEN,
        max_model_len=mml, lengths=[340, 330, 320, 310, 12, 63, 100], drop_streams=200,
        burst=12, shutdown_timeout=30, request_timeout=300, start_timeout=300, out=tmp_path,
        launch=([*soak.server_args(blocks, max_num_seqs=8, max_model_len=mml), *extra], {}),
    )  # fmt: skip
    s = soak.Soak(cfg).run()
    print(soak.table(s))
    assert s["lost"] == 0, s
    assert s["failures"] == 0, s["examples"]
    assert s["problems"] == [], s["problems"]
    served = {"plain": "ok", "stream": "ok", "abort": "aborted", "n2": "ok", "stop": "ok",
              "chat": "ok", "bad": "rejected_4xx", "burst": "ok"}  # fmt: skip
    for kind, outcome in served.items():
        assert s["by_kind"].get(kind, {}).get(outcome, 0) > 0, (kind, s["by_kind"])
    ph = s["phases"]
    assert ph["drop"]["opened"] == 200, ph["drop"]
    assert ph["max_len"]["max_len_exact"]["outcome"] == "ok", ph["max_len"]
    assert ph["max_len"]["max_len_over"]["outcome"] == "rejected_4xx", ph["max_len"]
    assert ph["burst"]["outcomes"] == {"ok": 12}, ph["burst"]
    assert ph["sigterm"]["clean"] and ph["sigterm"]["healthy_after_restart"], ph["sigterm"]
    c = s["correctness"]
    assert c["real"] == 0 and c["near_tie"] == 0 and c["not_rerun"] == 0, c  # fp32 CPU
    assert c["identical"] >= 10, c
    assert s["preemptions"] > 0, "the KV cache did not force a preemption"
    assert s["rss_mb_after"] < s["rss_mb_before"] * 1.5 + 200, s


def test_criterion_tells_near_ties_from_real_divergences():
    import soak

    ref = soak.Answer(tokens=[1, 2, 3], tops=[[-0.1, -3.0], [-0.5, -0.52], [-0.1, -2.0]])
    assert soak.compare(soak.Answer(tokens=[1, 2, 3]), ref)[0] == "identical"
    tie = soak.compare(soak.Answer(tokens=[1, 7, 8]), ref)
    assert tie == ("near_tie", {"first_difference": 1, "top2_gap": pytest.approx(0.02)})
    assert soak.compare(soak.Answer(tokens=[9, 2, 3]), ref)[0] == "real"
    assert soak.TIE_TOL == 0.05  # benchmarks/real_model/gpu_check.py's, imported
    # a bf16 engine's gaps come in bf16 steps of the logit (1/8 for logits in [16, 32))
    step = soak.Answer(tokens=[1, 2, 3], tops=[[-0.1, -3.0], [-0.5, -0.625], [-0.1, -2.0]])
    assert soak.compare(soak.Answer(tokens=[1, 7]), step)[0] == "real"
    assert soak.compare(soak.Answer(tokens=[1, 7]), step, tie_tol=0.125)[0] == "near_tie"


def test_diverging_requests_are_listed_with_their_gaps():
    import soak

    c = {"diverging_requests": {"('chat', 1)": {"occurrences": 40, "real": 36, "near_tie": 2,
                                                "gaps": {"0.125": 36, "0.0": 2}}}}  # fmt: skip
    lines = soak.diverging_lines(c)
    row = [x.strip() for x in lines[2].strip("|").split("|")]
    assert row == ["('chat', 1)", "40", "2", "36", "0.0: 2, 0.125: 36"]
    assert soak.diverging_lines({}) == []
