"""``python -m mesa_vllm.eval passkey|needle|ppl ...`` (same as ``mesa-vllm eval``)."""

import sys

from mesa_vllm.eval.cli import main

sys.exit(main())
