"""What tests and benchmarks check the product with: models and tokenizers the project makes
itself (no model hub is reachable anywhere), paged test batches, and the dense references of
the Mesa contract (reference.py) and of the weave-PE variants (reference_variants.py)."""
