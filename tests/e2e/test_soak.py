"""A short soak (issue 7) in the suite: concurrent clients against a real Mesa server with a
KV cache small enough to force preemption; outputs equal the same requests run alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_short_soak_with_preemption(tiny_llama, tmp_path):
    import soak

    from mesa_vllm.eval.server import LocalServer

    # 48 blocks x 16 = 768 tokens = max_model_len.  Two ~330-token prompts fill 42 blocks and
    # their 48-token decodes need 6 more each: with 6 clients, mostly long, decodes preempt.
    args = soak.server_args(kv_blocks=48, max_num_seqs=8, max_model_len=768)
    with LocalServer(
        str(tiny_llama), args, log_path=tmp_path / "soak.log", served_name="soak", timeout=400
    ) as srv:
        rss0 = soak._rss_mb(srv.proc.pid)
        summary = soak.run_soak(
            srv.base_url,
            "soak",
            duration=40,
            clients=6,
            max_requests=150,
            max_tokens=48,
            lengths=[340, 330, 320, 310, 12, 63],
        )
        preemptions = soak._preemptions(srv.base_url)
        rss1 = soak._rss_mb(srv.proc.pid)
    assert summary["errors"] == [], summary["errors"]
    assert summary["mismatches"] == [], summary["mismatches"]
    assert summary["completed"] >= 10
    assert summary["healthy_after"]
    assert preemptions > 0, "the KV cache did not force a preemption"
    assert rss1 < rss0 * 1.5 + 200, f"server RSS grew from {rss0:.0f} to {rss1:.0f} MB"
