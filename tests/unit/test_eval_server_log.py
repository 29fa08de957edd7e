"""What a failed vLLM server's log says: the first exception, not the API server's echo."""

from __future__ import annotations

import pytest

from mesa_vllm.eval.server import root_cause

pytestmark = pytest.mark.unit

ENGINE_OOM = """\
(APIServer pid=5510) WARNING 12-01 17:29:13 [system_utils.py:299] Found ulimit of 20000 and \
failed to automatically increase with error current limit exceeds maximum limit. This can \
cause fd limit errors like `OSError: [Errno 24] Too many open files`. Consider increasing
(EngineCore pid=5943) ERROR 12-01 17:29:40 [core.py:1330] Traceback (most recent call last):
(EngineCore pid=5943) ERROR 12-01 17:29:40 [core.py:1330]     tensor = torch.zeros(
(EngineCore pid=5943) ERROR 12-01 17:29:40 [core.py:1330] torch.OutOfMemoryError: CUDA out of \
memory. Tried to allocate 342.00 MiB.
(APIServer pid=5510)     raise RuntimeError(
(APIServer pid=5510) RuntimeError: Engine core initialization failed. See root cause above.
"""
IMPORT = """\
Traceback (most recent call last):
  File "/tmp/site/vllm/entrypoints/openai/api_server.py", line 35, in <module>
ModuleNotFoundError: No module named 'jmespath'
"""


@pytest.mark.parametrize(
    "log, cause",
    [
        (ENGINE_OOM, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 342.00 MiB."),
        (IMPORT, "ModuleNotFoundError: No module named 'jmespath'"),
        ("INFO all good\n", None),
    ],
)
def test_root_cause_is_the_first_exception(tmp_path, log, cause):
    path = tmp_path / "server.log"
    path.write_text(log)
    assert root_cause(path) == cause


def test_missing_log_has_no_cause(tmp_path):
    assert root_cause(tmp_path / "absent.log") is None
