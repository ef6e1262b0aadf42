"""Shared helpers for the gateway tests: dev backends, a real uvicorn gateway in a thread, platform data.

No tests here. Heavy things (the tiny model, its adapters, the dev backends serving them) are built once
per test process and cached at module level, because several test modules share them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import threading
import time
import urllib.request
from concurrent.futures import Future
from pathlib import Path

import uvicorn

from serving.gateway import GatewayApp
from serving.models import Adapter, AdapterDeployment, Backend, BackendPool, BaseModel, ModelConfig
from tenants import services
from tenants.models import ApiKey

MODEL_ID = "platform/tiny-chat"
ADAPTER_A = "ft:tiny-chat:acme:a:1"
ADAPTER_B = "ft:tiny-chat:globex:b:2"


# ---- backends ------------------------------------------------------------------------------------


def _make_adapter(base: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:  # non-zero B: the adapter really changes the output
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(out)
    return out


@functools.lru_cache(maxsize=None)
def tiny_backend() -> dict:
    """A dev backend on the real tiny model with two adapters (built once per process)."""
    import tempfile

    from devbackend.config import BackendConfig
    from devbackend.runner import run_in_thread
    from devbackend.tinymodel import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="gw-tiny-"))
    base = build_tiny_model(root / "tiny-chat", model_id=MODEL_ID)
    a = _make_adapter(base, root / "adapter-a", 1)
    b = _make_adapter(base, root / "adapter-b", 2)
    url, stop = run_in_thread(BackendConfig(model=str(base), port=0, flavor="dev", lora_adapters={ADAPTER_A: str(a), ADAPTER_B: str(b)}))
    return {"url": url, "stop": stop, "path": base}


def sim_backend(**overrides) -> tuple[str, callable]:
    from devbackend.config import BackendConfig
    from devbackend.runner import run_in_thread

    config = dict(simulate=True, port=0, flavor="dev", sim_tokens_per_second=0, sim_ttft_ms=1, model_id=MODEL_ID)
    config.update(overrides)
    return run_in_thread(BackendConfig(**config))


def http_json(method: str, url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def dev_stats(url: str) -> dict:
    return http_json("GET", url + "/_dev/stats")[1]


def set_faults(url: str, **faults) -> None:
    status, body = http_json("POST", url + "/_dev/faults", faults)
    assert status == 200, body


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


# ---- the gateway -----------------------------------------------------------------------------------


class _PromptlyStoppedServer(uvicorn.Server):
    """uvicorn's server, stopped without its idle waits: uvicorn notices `should_exit` on a 0.1 s tick and then
    sleeps 0.1 s for its connections to close even when there are none, about 0.2 s of every gateway test's
    teardown (185 gateway tests in the fast lane). Here `stop_soon` wakes the loop at once, and with no connection
    open the shutdown goes straight to waiting for tasks and the app's lifespan shutdown, as uvicorn's does."""

    _stop_requested: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._loop, self._stop_requested = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            try:
                await asyncio.wait_for(self._stop_requested.wait(), 0.1)
            except asyncio.TimeoutError:
                pass

    def stop_soon(self) -> None:
        """From any thread. `should_exit` first: a loop not yet waiting sees it on its next tick."""
        self.should_exit = True
        if self._stop_requested is not None:
            with contextlib.suppress(RuntimeError):  # its loop already closed: the server has stopped
                self._loop.call_soon_threadsafe(self._stop_requested.set)

    async def shutdown(self, sockets=None) -> None:
        if self.server_state.connections or sockets:
            return await super().shutdown(sockets)
        for server in self.servers:
            server.close()
        await self._wait_tasks_to_complete()
        await self.lifespan.shutdown()


class GatewayServer:
    """The gateway app under a real uvicorn server in a thread (real sockets: streaming, disconnects)."""

    def __init__(self, app: GatewayApp):
        self.app = app
        self.server = _PromptlyStoppedServer(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning", loop="asyncio"))
        self.thread = threading.Thread(target=self.server.run, name="gateway-uvicorn", daemon=True)

    def start(self) -> "GatewayServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.server.stop_soon()
        self.thread.join(timeout=15)


# ---- platform data ---------------------------------------------------------------------------------


def make_base_model(name: str = "tiny-chat", **kw) -> BaseModel:
    return BaseModel.objects.create(name=name, hf_id=MODEL_ID, context_length=1024, **kw)


def make_pool(name: str, base: BaseModel, urls: list[str], *, kind: str = "dev", adapters: list[str] = (), dedicated=None) -> BackendPool:
    pool = BackendPool.objects.create(name=name, base_model=base, kind=kind, dedicated_tenant=dedicated)
    for url in urls:
        Backend.objects.create(pool=pool, url=url, loaded_adapters=list(adapters), max_concurrency=8)
    return pool


def deploy_adapter(tenant, name: str, base: BaseModel, pool: BackendPool) -> Adapter:
    adapter = Adapter.all_tenants.create(tenant=tenant, name=name, base_model=base, path="/unused")
    AdapterDeployment.all_tenants.create(tenant=tenant, adapter=adapter, pool=pool, state=AdapterDeployment.State.ACTIVE)
    return adapter


def make_key(tenant, scopes=("inference",)) -> tuple[ApiKey, str]:
    return services.api_key_create(tenant=tenant, name="test", scopes=list(scopes), actor=services.SYSTEM)


def set_model_config(tenant, **fields) -> ModelConfig:
    config, _ = ModelConfig.all_tenants.get_or_create(tenant=tenant)
    for k, v in fields.items():
        setattr(config, k, v)
    config.save()
    return config


def usage_records(tenant):
    from serving.models import UsageRecord

    return list(UsageRecord.objects.for_tenant(tenant).order_by("created_at", "id"))


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05):
    """The predicate's first truthy value within `timeout` s. A read that meets the gateway's ledger writer in the
    in-memory SQLite test database ("database table is locked": shared cache has no busy timeout) is tried again."""
    from django.db import OperationalError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OperationalError as exc:
            if "locked" not in str(exc):
                raise
            value = None
        if value:
            return value
        time.sleep(interval)
    return predicate()


def post(url: str, body, headers: dict | None = None, *, method: str = "POST"):
    """A plain request (requests library); `body` is JSON unless bytes."""
    import requests

    kwargs = {"data": body} if isinstance(body, (bytes, str)) else {"json": body}
    return requests.request(method, url, headers=headers or {}, timeout=30, **kwargs)


def stream_lines(url: str, body: dict, headers: dict) -> tuple[int, list[str]]:
    import requests

    with requests.post(url, json=body, headers=headers, stream=True, timeout=30) as r:
        return r.status_code, [line for line in r.iter_lines(decode_unicode=True) if line]


def stream_then_hang_up(gw_url: str, key: str, max_tokens: int, events: int = 3) -> None:
    """Open a streamed chat completion on a raw socket, read `events` SSE events, then close: a client that leaves."""
    body = json.dumps({"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": max_tokens,
                       "stream": True}).encode()
    host, port = gw_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 + f"authorization: Bearer {key}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
    received = b""
    while received.count(b"data: ") < events:
        received += sock.recv(65536)
    sock.close()


def serve_forever(loop, app, started: Future) -> None:
    """Serve an aiohttp app on `loop` (in the calling thread) on a free port; `started` gets its URL."""
    from aiohttp import web

    asyncio.set_event_loop(loop)
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    host, port = runner.addresses[0][:2]
    started.set_result(f"http://{host}:{port}")
    loop.run_forever()
    loop.run_until_complete(runner.cleanup())


class ToolCallingBackend:
    """A scripted OpenAI-compatible backend that answers every chat request with tool calls, streamed exactly as
    vLLM's tool parsers stream them (`--enable-auto-tool-choice`): a role chunk, then per call one chunk with
    `id`, `type`, `index` and `function.name`, then `function.arguments` fragments, a last chunk with
    `finish_reason: "tool_calls"`, the usage chunk and `[DONE]`. `self.bodies` holds what it received.

    `self.script`: `("content", text)` or `("call", index, name, [argument fragments])` items, in order."""

    def __init__(self):
        self.script: list[tuple] = [("call", 0, "get_weather", ['{"city": ', '"Par', 'is"}'])]
        self.prompt_tokens = 11
        self.bodies: list[dict] = []
        self.loop = asyncio.new_event_loop()
        started: Future = Future()
        threading.Thread(target=self._main, args=(started,), daemon=True, name="tool-backend").start()
        self.url = started.result(timeout=10)

    def tokens(self) -> int:
        return sum(1 if item[0] == "content" else 1 + len(item[3]) for item in self.script)

    def _main(self, started: Future) -> None:
        from aiohttp import web

        async def health(request):
            return web.Response()

        async def chat(request):
            body = await request.json()
            self.bodies.append(body)
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            head = {"id": "chatcmpl-backend", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}

            async def chunk(delta: dict, finish=None):
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                if finish:
                    choice["stop_reason"] = None
                await resp.write(b"data: " + json.dumps({**head, "choices": [choice]}).encode() + b"\n\n")
                await asyncio.sleep(0.002)

            await chunk({"role": "assistant", "content": ""})
            called = False
            for item in self.script:
                if item[0] == "content":
                    await chunk({"content": item[1]})
                    continue
                _, index, name, fragments = item
                called = True
                await chunk({"tool_calls": [{"id": f"chatcmpl-tool-{index}abc", "type": "function", "index": index,
                                             "function": {"name": name}}]})
                for fragment in fragments:
                    await chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
            await chunk({"content": ""}, "tool_calls" if called else "stop")
            n = self.tokens()
            usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}
            await resp.write(b"data: " + json.dumps({**head, "choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n")
            return resp

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_post("/v1/chat/completions", chat)
        serve_forever(self.loop, app, started)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def settled_day_counters(tenant) -> dict[str, int]:
    """The tenant's day-window counters {used, reserved} once nothing is reserved any more."""
    import asyncio

    from serving.admission import get_admission

    def now():
        snap = get_admission().snapshot(tenant.pk, "day")
        return asyncio.run(snap) if asyncio.iscoroutine(snap) else snap

    return wait_for(lambda: now()["reserved"] == 0 and now()) or now()

