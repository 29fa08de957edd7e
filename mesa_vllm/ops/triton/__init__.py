"""Triton kernels of Mesa attention over vLLM's paged KV cache (keys cached unrotated).

table.py: segment tables, launch options and decode split sizing (host side, no Triton);
jit.py: the device helpers both kernels share; prefill.py: ``mesa_prefill``; decode.py:
``mesa_decode``.  Import the submodules: this package imports nothing, so the host side
loads without Triton.
"""
