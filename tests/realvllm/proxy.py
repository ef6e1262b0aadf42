"""A recording reverse proxy between the gateway and vLLM: what the platform really sends, on the wire.

No tests here. Every request is forwarded as it came; POST bodies are kept in `requests` as (path, JSON, the status
vLLM answered), and responses stream back unchanged.
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import Future

from tests.support.gateway import serve_forever


class RecordingProxy:
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.requests: list[tuple[str, dict, int]] = []
        self._sessions: list = []  # the one aiohttp session to vLLM, made in the proxy's loop
        self.loop = asyncio.new_event_loop()
        started: Future = Future()
        threading.Thread(target=self._main, args=(started,), daemon=True, name="recording-proxy").start()
        self.url = started.result(timeout=10)

    def bodies(self, path: str) -> list[dict]:
        return [body for p, body, _ in self.requests if p == path]

    def stop(self) -> None:
        async def close():
            for session in self._sessions:
                await session.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def _main(self, started: Future) -> None:
        import aiohttp
        from aiohttp import web

        session = self._sessions

        async def forward(request: web.Request) -> web.StreamResponse:
            if not session:
                session.append(aiohttp.ClientSession(auto_decompress=False))
            raw = await request.read()
            async with session[0].request(request.method, self.upstream + request.path_qs, data=raw,
                                          headers={"content-type": request.headers.get("content-type", "application/json")}) as up:
                if request.method == "POST":
                    self.requests.append((request.path, json.loads(raw or b"null"), up.status))
                resp = web.StreamResponse(status=up.status, headers={"content-type": up.headers.get("content-type", "application/json")})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        serve_forever(self.loop, app, started)
