"""Models and tokenizers the project makes itself (no model hub is reachable anywhere)."""
