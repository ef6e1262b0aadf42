"""A scripted stand-in for vLLM 0.32's OpenAI server, answering as the real one was measured to (tests/realvllm).

No tests here. What it imitates: `/v1/models` (base and loaded adapters), runtime LoRA loading (`already been loaded`
as a 400, a refusal as the status and message scripted in `refuse`), 404 NotFoundError for a model it does not
hold ("The model `x` does not exist. Valid aliases: …"), and streamed completions / chat with continuous usage and,
when asked (`logprobs`, `return_token_ids`), per-token ids and log-probabilities. Every token is TOKEN_TEXT.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from concurrent.futures import Future

from tests.support.gateway import serve_forever

MODEL = "platform/tiny-chat"
TOKEN_ID, TOKEN_TEXT, TOKEN_LOGPROB = 268, "es", -0.09933397173881531


class FakeVLLM:
    def __init__(self, model: str = MODEL):
        self.model = model
        self.loaded: dict[str, str] = {}  # adapter name -> path
        self.refuse: dict[str, tuple[int, str]] = {}  # adapter name -> (status, message) its load is answered with
        self.loads: Counter = Counter()  # load requests per adapter name
        self.bodies: list[dict] = []  # generation requests, as received
        self.token_details = True  # False: ignores `logprobs` / `return_token_ids`, as vLLM before 0.10.2 did the latter
        self.fail: tuple[int, str] | None = None  # (status, message) every generation request is answered with
        self.hold_first_text = False  # the first token's text comes with the second (vLLM holds text back: stop strings, UTF-8)
        self.loop = asyncio.new_event_loop()
        started: Future = Future()
        threading.Thread(target=self._main, args=(started,), daemon=True, name="fake-vllm").start()
        self.url = started.result(timeout=10)

    def forget(self) -> None:
        """What a restart does: every runtime-loaded adapter is gone."""
        self.loaded.clear()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)

    def _main(self, started: Future) -> None:
        from aiohttp import web

        def error(status: int, message: str, kind: str):
            return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": status}}, status=status)

        async def health(request):
            return web.Response()

        async def models(request):
            data = [{"id": self.model, "object": "model", "root": "/models/tiny", "parent": None, "max_model_len": 1024}]
            data += [{"id": name, "object": "model", "root": path, "parent": self.model} for name, path in self.loaded.items()]
            return web.json_response({"object": "list", "data": data})

        async def load(request):
            body = await request.json()
            name = body["lora_name"]
            self.loads[name] += 1
            if name in self.loaded:
                return error(400, f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                                  "place, set 'load_inplace' to True.", "InvalidUserInput")
            if name in self.refuse:
                status, message = self.refuse[name]
                return error(status, message, "InternalServerError" if status >= 500 else "BadRequestError")
            self.loaded[name] = body["lora_path"]
            return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

        async def unload(request):
            name = (await request.json())["lora_name"]
            if self.loaded.pop(name, None) is None:
                return error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

        async def generate(request):
            body = await request.json()
            self.bodies.append(body)
            chat = request.path.endswith("/chat/completions")
            if self.fail is not None:
                return error(*self.fail, "InternalServerError")
            if body["model"] != self.model and body["model"] not in self.loaded:
                aliases = ", ".join([self.model, *self.loaded])
                return error(404, f"The model `{body['model']}` does not exist. Valid aliases: {aliases}.", "NotFoundError")
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            n, prompt = body["max_tokens"], 7
            stops = body.get("stop") or []  # a stop sequence matches at the second token, cut out of the text as vLLM does
            if stops:
                n = min(n, 2)
            for i in range(1, n + 1):
                finish = ("stop" if stops else "length") if i == n else None
                if chat:
                    choice = {"index": 0, "delta": {"content": TOKEN_TEXT}, "logprobs": None, "finish_reason": finish}
                else:
                    text = "" if (stops and finish) or (self.hold_first_text and i == 1) else TOKEN_TEXT
                    text *= 2 if self.hold_first_text and i == 2 else 1
                    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                              "stop_reason": stops[0] if stops and finish else None}
                    if body.get("logprobs") is not None and self.token_details:
                        choice["logprobs"] = {"text_offset": [2 * (i - 1)], "token_logprobs": [TOKEN_LOGPROB], "tokens": [TOKEN_TEXT],
                                              "top_logprobs": [{TOKEN_TEXT: TOKEN_LOGPROB}]}
                    choice["token_ids"] = [TOKEN_ID] if body.get("return_token_ids") and self.token_details else None
                usage = {"prompt_tokens": prompt, "total_tokens": prompt + i, "completion_tokens": i}
                await resp.write(b"data: " + json.dumps({"id": "cmpl-fake", "object": "text_completion", "model": body["model"],
                                                         "choices": [choice], "usage": usage}).encode() + b"\n\n")
            usage = {"prompt_tokens": prompt, "total_tokens": prompt + n, "completion_tokens": n}
            await resp.write(b"data: " + json.dumps({"id": "cmpl-fake", "choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n")
            return resp

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/load_lora_adapter", load)
        app.router.add_post("/v1/unload_lora_adapter", unload)
        app.router.add_post("/v1/completions", generate)
        app.router.add_post("/v1/chat/completions", generate)
        serve_forever(self.loop, app, started)
