"""Running the server: in the foreground (the CLI), in a background thread, or in a subprocess (tests)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from concurrent.futures import Future
from typing import Callable, Sequence

from aiohttp import web

from .app import create_app
from .config import BackendConfig

READY_PREFIX = "devbackend listening on "


async def _start(config: BackendConfig, port: int) -> tuple[web.AppRunner, str]:
    # handler_cancellation: a client that disconnects cancels its handler, which stops the generation.
    runner = web.AppRunner(create_app(config), handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.host, port, backlog=1024).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def serve(config: BackendConfig) -> None:
    """Serve until cancelled; prints the URL (the real port when --port 0) for whoever started us."""
    runner, url = await _start(config, config.port)
    print(READY_PREFIX + url, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run_in_thread(config: BackendConfig, *, port: int = 0) -> tuple[str, Callable[[], None]]:
    """Start the server on its own event loop in a daemon thread; returns (base_url, stop).

    `port` (not config.port) is used: 0, the default, picks a free one.
    """
    loop = asyncio.new_event_loop()
    started: Future = Future()

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            runner, url = loop.run_until_complete(_start(config, port))
        except BaseException as exc:  # hand startup failures (bad model path, port in use) to the caller
            started.set_exception(exc)
            loop.close()
            return
        started.set_result(url)
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=main, name="devbackend", daemon=True)
    thread.start()
    url = started.result(timeout=120)

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    return url, stop


def run_in_subprocess(args: Sequence[str], *, timeout: float = 120,
                      env: dict[str, str] | None = None) -> tuple[str, Callable[[], None]]:
    """`python -m devbackend ARGS --port 0` in a child process; returns (base_url, stop).

    A separate process keeps load tests off the caller's GIL; the port is read from the ready line.
    """
    command = [sys.executable, "-m", "devbackend", *args]
    if "--port" not in args:
        command += ["--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    ready: Future = Future()

    def read_ready_line() -> None:
        for line in process.stdout:  # keep draining so the child never blocks on a full pipe
            if line.startswith(READY_PREFIX) and not ready.done():
                ready.set_result(line[len(READY_PREFIX):].strip())
        if not ready.done():
            ready.set_exception(RuntimeError(f"devbackend exited with status {process.wait()} before listening"))

    threading.Thread(target=read_ready_line, name="devbackend-stdout", daemon=True).start()

    def stop() -> None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    try:
        return ready.result(timeout=timeout), stop
    except BaseException:
        stop()
        raise
