"""A local HTTP endpoint for webhook actions: what ``ia bench`` calls, and what
the tests count side effects with.

It answers every POST with ``status`` (after ``delay_s``), and counts the calls
per ``Idempotency-Key`` header, so a test can tell an action executed twice.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookSink:
    """A real HTTP endpoint that counts POSTs per Idempotency-Key.

    >>> import httpx
    >>> with WebhookSink() as sink:
    ...     _ = httpx.post(sink.url, json={"a": 1}, headers={"Idempotency-Key": "k"})
    >>> sink.count, sink.calls["k"], sink.bodies
    (1, 1, [{'a': 1}])
    """

    def __init__(self, status: int = 200, delay_s: float = 0.0) -> None:
        self.calls: Counter[str] = Counter()
        self.bodies: list[dict] = []
        self.status = status
        self.delay_s = delay_s
        # The server is threaded: concurrent actions must not lose counts.
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with sink.lock:
                    sink.calls[self.headers.get("Idempotency-Key", "")] += 1
                    sink.bodies.append(json.loads(body or b"{}"))
                if sink.delay_s:
                    time.sleep(sink.delay_s)
                self.send_response(sink.status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def count(self) -> int:
        """All calls received."""
        with self.lock:
            return sum(self.calls.values())

    def __enter__(self) -> WebhookSink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
