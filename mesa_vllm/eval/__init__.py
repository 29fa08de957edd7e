"""Evaluation: synthetic long-context tasks (passkey, needle, perplexity) and the harness."""
