"""A local webhook receiver (loopback: allowed only by the tests' PLATFORM_WEBHOOKS_ALLOW_LOOPBACK) that records what
it is sent."""

from __future__ import annotations

import http.server
import threading


class Receiver:
    """Answers every POST with `status` (or a 307 to `redirect_to`) and keeps (headers, body) in `requests`."""

    def __init__(self, status: int = 200, redirect_to: str | None = None, path: str = "/hook"):
        self.requests: list[tuple[dict, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((dict(self.headers), body))
                if redirect_to:
                    self.send_response(307)
                    self.send_header("Location", redirect_to)
                else:
                    self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}{path}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
