"""The eval client sends a request again when its connection drops before any reply, and
records an HTTP error or a timeout as it is (a real HTTP server on loopback, real client)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mesa_vllm.eval import harness
from mesa_vllm.eval.harness import Job


def _completion(text: str) -> bytes:
    return json.dumps(
        {
            "id": "c",
            "object": "text_completion",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    ).encode()


def _serve(plan: list[str]):
    """A server whose n-th POST does plan[n] ('drop': close the socket unanswered, 'ok',
    '500', 'slow'); the last entry repeats.  Returns (server, posts seen)."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):  # /v1/models
            body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]})
            self._reply(200, body.encode())

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            action = plan[min(len(seen), len(plan) - 1)]
            seen.append(action)
            if action == "drop":
                self.close_connection = True
                self.connection.close()
                return
            if action == "slow":
                threading.Event().wait(2.0)
            if action == "500":
                self._reply(500, b'{"error": {"message": "boom"}}')
                return
            self._reply(200, _completion("the key is 4711"))

        def _reply(self, code: int, body: bytes):
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except BrokenPipeError:  # the client timed out first
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def _run(plan: list[str], timeout: float = 30.0):
    server, seen = _serve(plan)
    try:
        ep = harness.connect(f"http://127.0.0.1:{server.server_port}", timeout=timeout)
        job = Job(1000, None, 0, "the key is 4711. what is the key?", "4711", 10)
        (rec,) = harness.run_jobs(ep, "passkey", [job], concurrency=1)
    finally:
        server.shutdown()
    return rec, seen


def test_a_dropped_connection_is_sent_again_and_counted():
    rec, seen = _run(["drop", "ok"])
    assert seen == ["drop", "ok"]
    assert rec["error"] is None and rec["correct"] is True
    assert rec["retries"] == 1


def test_retries_are_bounded_and_the_last_error_kept():
    rec, seen = _run(["drop"])
    assert len(seen) == 1 + harness.CONNECTION_RETRIES
    assert rec["error"].startswith("APIConnectionError")
    assert rec["retries"] == harness.CONNECTION_RETRIES


@pytest.mark.parametrize("action, error", [("500", "InternalServerError"), ("slow", "APITimeout")])
def test_an_http_error_or_a_timeout_is_not_sent_again(action, error):
    rec, seen = _run([action, "ok"], timeout=0.5)
    assert seen == [action]
    assert rec["error"].startswith(error) and "retries" not in rec
