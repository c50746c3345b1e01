"""A fault-injecting OpenAI-compatible HTTP server for tests, on 127.0.0.1 only.

    with FakeServer(faults=["500", "garbage", "ok"]) as server:
        client = LLMClient(server.base_url, "fake")

Each chat request takes the next fault from `faults` (then "ok" for the rest):
  ok           a valid explanation JSON answer
  400/429/500/503  that HTTP status
  garbage_body HTTP 200 with a body that is not JSON
  garbage      a valid completion whose content is not JSON
  bad_enum     valid JSON with a granularity outside the classes
  truncated    valid JSON, but finish_reason "length" (cut short by max_tokens)
  hang         no answer for `hang_seconds` (bounded), then a valid one
`down_after=N` answers 500 to every chat request after the first N. /v1/completions answers
(after `delay` too) `completion_text(request)` (default " Paris.") with logprobs in the completions form (tokens / token_logprobs / top_logprobs), and
/tokenize counts UTF-8 bytes / 4 as llama.cpp's {"tokens": [...]}. `max_model_len` is listed in
/v1/models as vLLM does, `props_n_ctx` answered at /props as llama.cpp's per-slot n_ctx. Run as a script
(`python tests/fakeserver.py --port P`) it serves until killed.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

GOOD_ANSWER = {"description": "the word highway", "granularity": "token", "cross_lingual": False,
               "confidence": 0.8}


def completion(content: str, request: dict[str, Any], finish_reason: str = "stop") -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason,
                              "message": {"role": "assistant", "content": content}}
    if request.get("logprobs"):
        k = int(request.get("top_logprobs") or 1)
        choice["logprobs"] = {"content": [
            {"token": ch, "logprob": -0.1, "bytes": None,
             "top_logprobs": [{"token": str(i), "logprob": -0.1 * (i + 1), "bytes": None} for i in range(k)]}
            for ch in content[:8]]}
    return {"id": "fake-1", "object": "chat.completion", "created": int(time.time()), "model": request.get("model"),
            "choices": [choice], "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}


def text_completion(text: str, request: dict[str, Any]) -> dict[str, Any]:
    """A /v1/completions answer, logprobs in the completions form (as OpenAI and vLLM send them)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "text": text, "logprobs": None}
    if request.get("logprobs") is not None:
        tokens = [" Paris", "."]
        choice["logprobs"] = {"tokens": tokens, "token_logprobs": [-0.25, -0.5], "text_offset": [0, 6],
                              "top_logprobs": [{" Paris": -0.25, " London": -4.0}, {".": -0.5, ",": -1.5}]}
    return {"id": "fake-2", "object": "text_completion", "created": int(time.time()), "model": request.get("model"),
            "choices": [choice], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


class FakeServer:
    def __init__(self, faults: list[str] | None = None, answer: Callable[[dict], str] | None = None,
                 delay: float = 0.0, hang_seconds: float = 3.0, down_after: int | None = None, port: int = 0,
                 tokenize: bool = True, completion_text: Callable[[dict], str] | None = None,
                 max_model_len: int | None = None, props_n_ctx: int | None = None):
        self.faults = deque(faults or [])
        self.completion_text = completion_text or (lambda request: " Paris.")
        self.answer = answer or (lambda request: json.dumps(GOOD_ANSWER))
        self.delay, self.hang_seconds, self.down_after = delay, min(hang_seconds, 30.0), down_after
        self.tokenize = tokenize
        self.max_model_len, self.props_n_ctx = max_model_len, props_n_ctx
        self.requests = 0  # chat requests received, faulted ones included
        self.in_flight = self.max_in_flight = 0
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread: threading.Thread | None = None

    def _next_fault(self, body: dict[str, Any]) -> str:
        with self.lock:
            self.requests += 1
            self.bodies.append(body)
            if self.down_after is not None and self.requests > self.down_after:
                return "500"
            return self.faults.popleft() if self.faults else "ok"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def _json(self, status: int, obj: Any) -> None:
                self._send(status, json.dumps(obj, ensure_ascii=False).encode())

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    model = {"id": "fake-model", "object": "model"}
                    if server.max_model_len:
                        model["max_model_len"] = server.max_model_len
                    self._json(200, {"object": "list", "data": [model]})
                elif self.path == "/props" and server.props_n_ctx:
                    self._json(200, {"default_generation_settings": {"n_ctx": server.props_n_ctx}})
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/tokenize" and server.tokenize:
                    self._json(200, {"tokens": list(range(len(body.get("content", "").encode()) // 4))})
                    return
                if self.path == "/v1/completions":
                    with server.lock:
                        server.bodies.append(body)
                    if server.delay:
                        time.sleep(server.delay)
                    self._json(200, text_completion(server.completion_text(body), body))
                    return
                if self.path != "/v1/chat/completions":
                    self._json(404, {"error": "not found"})
                    return
                fault = server._next_fault(body)
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(fault, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, fault: str, body: dict[str, Any]) -> None:
                if server.delay:
                    time.sleep(server.delay)
                if fault == "hang":
                    time.sleep(server.hang_seconds)
                    fault = "ok"
                if fault in ("400", "429", "500", "503"):
                    self._json(int(fault), {"error": {"message": f"injected {fault}", "type": "server_error"}})
                elif fault == "garbage_body":
                    self._send(200, b"<html>definitely not json", "text/html")
                elif fault == "garbage":
                    self._json(200, completion("Sure! The feature is about roads.", body))
                elif fault == "truncated":
                    self._json(200, completion(server.answer(body), body, finish_reason="length"))
                elif fault == "bad_enum":
                    self._json(200, completion(json.dumps({**GOOD_ANSWER, "granularity": "banana"}), body))
                else:
                    self._json(200, completion(server.answer(body), body))

        return Handler

    def start(self) -> "FakeServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FakeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--faults", default="", help="comma-separated faults for the first requests")
    args = parser.parse_args()
    fake = FakeServer(faults=[f for f in args.faults.split(",") if f], delay=args.delay, port=args.port)
    print(fake.base_url, flush=True)
    fake.httpd.serve_forever()
