"""``python -m mesa_vllm.eval TASK[,TASK...] ...`` (same as ``mesa-vllm eval``); also
``python -m mesa_vllm.eval corpus pydoc [--out FILE]`` (builds the real-text corpus)."""

import sys

from mesa_vllm.eval.cli import main

sys.exit(main())
