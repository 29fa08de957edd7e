"""Evaluation: long-context tasks (passkey, needle, perplexity on synthetic or real text),
the harness, the real-text corpus (``corpus``) and the parallel server scheduler."""
