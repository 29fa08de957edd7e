"""Attention operators: the torch path (torch_mesa.py, weave.py, rope.py) and the Triton
kernels (triton/).  The dense references they are checked against are in mesa_vllm/testing/."""
