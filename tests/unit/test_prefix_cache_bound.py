"""patches.bound_prefix_cache (patch 3): with ``split: fixed`` blocks are cached, and hit,
only inside each request's stable prefix (plan.stable_prefix).  vLLM's KVCacheManager is
stood in for by the two calls the patch wraps; the real engine is in
tests/e2e/test_prefix_caching.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mesa_vllm.patches import bound_prefix_cache
from mesa_vllm.plan import MesaParams

pytestmark = pytest.mark.unit

P = MesaParams(train_len=64, first_chunk=4, last_chunk=16, max_remainder=8, split="fixed")


class Coordinator:
    def __init__(self):
        self.cached, self.lookups = [], []

    def cache_blocks(self, request, num_computed_tokens):
        self.cached.append(num_computed_tokens)

    def find_longest_cache_hit(self, block_hashes, max_cache_hit_length):
        self.lookups.append(max_cache_hit_length)
        return (), 0, 0


class Manager:
    def __init__(self):
        self.coordinator = Coordinator()

    def get_computed_blocks(self, request):
        return self.coordinator.find_longest_cache_hit(None, request.num_tokens - 1)


def req(prompt, total=None):
    return SimpleNamespace(num_prompt_tokens=prompt, num_tokens=total or prompt)


def test_cache_and_hits_are_capped_at_the_stable_prefix():
    m = Manager()
    bound_prefix_cache(m, P)
    bound_prefix_cache(m, P)  # idempotent
    c = m.coordinator
    c.cache_blocks(req(230), 230)  # last chunk starts at 184
    c.cache_blocks(req(40), 40)  # short prompt: everything computed so far
    c.cache_blocks(req(40, 100), 100)  # decoded past L: only [0, L)
    c.cache_blocks(req(70), 70)  # T - F < Lc + C: only the first chunk
    assert c.cached == [184, 40, 64, 4]
    m.get_computed_blocks(req(230))
    m.get_computed_blocks(req(30))
    m.get_computed_blocks(req(70))
    assert c.lookups == [184, 29, 4]
    c.find_longest_cache_hit(None, 99)  # outside get_computed_blocks: unchanged
    assert c.lookups[-1] == 99
