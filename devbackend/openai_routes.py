"""The OpenAI-compatible API that TGI and vLLM both serve, plus vLLM's runtime LoRA endpoints.

The `model` field picks the adapter. Flavors tgi and dev serve the base model for any unknown name (TGI);
flavor vllm answers 404 as vLLM does. `cache_salt` (vLLM) is accepted and only counted.
"""

from __future__ import annotations

import time
import uuid

from aiohttp import web

from .generation import (Timing, backend_of, collect, number, produce, read_json, sse, start_sse, string_list,
                         visible_text)
from .protocol import BackendError, GenerationParams, Token, finalize_params, validation_error
from .state import Backend
from .tools import ToolCallStream, parse_tool_calls, tools_of

_FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


def _error_body(backend: Backend, error: BackendError) -> tuple[dict, int]:
    """vLLM reports invalid requests as 400 BadRequestError where TGI says 422."""
    status, kind = error.status, error.error_type
    if status == 422 and backend.config.flavor == "vllm":
        status, kind = 400, "BadRequestError"
    return {"message": error.message, "type": kind, "param": None, "code": status}, status


def openai_error(backend: Backend, error: BackendError) -> web.Response:
    body, status = _error_body(backend, error)
    return web.json_response({"error": body}, status=status)


def resolve_model(backend: Backend, model) -> str | None:
    """The adapter named by `model`, None for the base model; unknown names per flavor (see module doc)."""
    if model in backend.engine.adapters:
        return model
    if model in (None, "", backend.engine.model_id) or backend.config.flavor != "vllm":
        return None
    raise BackendError(404, f"The model `{model}` does not exist.", "NotFoundError")


def _content(message) -> dict:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise validation_error("each message needs a `role` and a `content`")
    content = message.get("content") or ""
    if isinstance(content, list):  # content parts: only text can reach a text model
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise validation_error("`content` must be a string or a list of text parts")
    out = {"role": message["role"], "content": content}
    if message.get("tool_calls"):  # rendered by the template (arguments as dicts, as templates expect)
        out["tool_calls"] = message["tool_calls"]
    if message.get("tool_call_id"):
        out["tool_call_id"] = message["tool_call_id"]
    return out


def _prompt(backend: Backend, body: dict, chat: bool) -> str:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise validation_error("`messages` must be a non-empty list")
        return backend.engine.render_chat([_content(m) for m in messages], tools_of(body)[0])
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise validation_error("`prompt` must be a string (batched prompts are not supported)")
    return prompt


def _params(body: dict) -> GenerationParams:
    if body.get("n", 1) != 1:
        raise validation_error("only n=1 is supported")
    temperature, top_p, top_k = number(body, "temperature"), number(body, "top_p"), number(body, "top_k", int)
    max_tokens = number(body, "max_completion_tokens", int)
    return GenerationParams(
        max_new_tokens=0,
        requested_max_new_tokens=max_tokens if max_tokens is not None else number(body, "max_tokens", int),
        do_sample=temperature != 0,  # OpenAI's default temperature is 1: sampling
        temperature=temperature if temperature not in (0, 1) else None,
        top_p=top_p if top_p != 1 else None,
        top_k=top_k if top_k and top_k > 0 else None,  # vLLM uses -1 for "off"
        seed=number(body, "seed", int),
        stop=string_list(body.get("stop"), "stop"),
        presence_penalty=number(body, "presence_penalty") or None,
        frequency_penalty=number(body, "frequency_penalty") or None,
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _answer_text(tokens: list[Token], params: GenerationParams) -> str:
    """OpenAI leaves the matched stop sequence out of a non-streamed answer."""
    text = visible_text(tokens)
    if tokens and tokens[-1].finish_reason == "stop_sequence":
        for stop in params.stop:
            at = text.find(stop)
            if at != -1:
                return text[:at]
    return text


async def _completion(request: web.Request, chat: bool) -> web.StreamResponse:
    backend = backend_of(request)
    timing, response, parse_calls = Timing(), None, False
    try:
        body = await read_json(request)
        backend.record(request.path, body, body.get("cache_salt"))
        adapter = resolve_model(backend, body.get("model"))
        params = _params(body)
        text_prompt = _prompt(backend, body, chat)
        cfg = backend.config
        async with backend.admit(request, adapter) as ticket:
            timing.admitted = time.monotonic()
            prompt = backend.engine.encode(text_prompt)
            finalize_params(params, len(prompt), cfg.max_input_tokens, cfg.max_total_tokens)
            meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                    "model": body.get("model") or backend.engine.model_id, "system_fingerprint": None}
            # Generated calls are parsed as vLLM's tool parsers do (flavors dev and vllm; TGI constrains its
            # output with a grammar instead, which is not imitated).
            parse_calls = chat and tools_of(body)[1] and cfg.flavor != "tgi"
            if body.get("stream"):
                response = await start_sse(request, {"x-compute-type": backend.engine.compute_type})
                # vLLM ≥ 0.10.2: a text completion asked for `logprobs` and `return_token_ids` carries each token's id
                # and log-probability (what the gateway needs for TGI's token events and `details`).
                token_details = not chat and body.get("return_token_ids") is True and body.get("logprobs") is not None
                await _stream(response, backend, ticket, prompt, params, adapter, meta, chat,
                              bool((body.get("stream_options") or {}).get("include_usage")), parse_calls, token_details)
            else:
                tokens = await collect(backend, ticket, prompt, params, adapter)
    except BackendError as error:
        if response is None:
            return openai_error(backend, error)
        await response.write(sse({"error": _error_body(backend, error)[0]}, b"data: "))
    if response is not None:
        return response
    if not ticket.finished:
        return web.Response(status=499)  # nobody is listening any more
    text, finish = _answer_text(tokens, params), _FINISH[tokens[-1].finish_reason]
    if chat:
        message = {"role": "assistant", "content": text}
        content, calls = parse_tool_calls(text) if parse_calls else (text, [])
        if calls:
            message, finish = {"role": "assistant", "content": content or None, "tool_calls": calls}, "tool_calls"
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    answer = {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
              "usage": _usage(len(prompt), len(tokens))}
    return web.json_response(answer, headers=timing.headers(backend.engine.compute_type, len(prompt), len(tokens)))


async def _stream(response, backend, ticket, prompt, params, adapter, meta, chat: bool, include_usage: bool,
                  parse_calls: bool = False, token_details: bool = False):
    usage = {"usage": None} if include_usage else {}
    head = {**meta, "object": "chat.completion.chunk" if chat else "text_completion", **usage}
    calls = ToolCallStream() if parse_calls else None

    def chunk(text: str | None, finish: str | None, first: bool = False, tool_call: dict | None = None) -> bytes:
        if chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text is not None else {})
            if tool_call is not None:
                delta = {"tool_calls": [tool_call]}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return sse({**head, "choices": [choice]}, b"data: ")

    def detailed(token) -> bytes:
        # vLLM leaves special tokens out of the text but lists them with their ids and log-probabilities.
        choice = {"index": 0, "text": "" if token.special else token.text, "finish_reason": None, "token_ids": [token.id],
                  "logprobs": {"tokens": [token.text], "token_logprobs": [token.logprob], "top_logprobs": None, "text_offset": [0]}}
        return sse({**head, "choices": [choice]}, b"data: ")

    generated, sent_text = 0, []
    if chat:
        await response.write(chunk("", None, first=True))
    async for batch in produce(backend, ticket, prompt, params, adapter):
        generated += len(batch)
        if token_details:
            events = [detailed(t) for t in batch]
            sent_text += [t.text for t in batch if not t.special]
            if batch[-1].finish_reason:
                end = {"index": 0, "text": "", "logprobs": None, "finish_reason": _FINISH[batch[-1].finish_reason]}
                if batch[-1].finish_reason == "stop_sequence":  # vLLM names the matched stop string
                    text = "".join(sent_text)
                    end["stop_reason"] = next((stop for stop in params.stop if text.endswith(stop) or stop in text), None)
                events.append(sse({**head, "choices": [end]}, b"data: "))
                if include_usage:
                    events.append(sse({**head, "choices": [], "usage": _usage(len(prompt), generated)}, b"data: "))
                events.append(b"data: [DONE]\n\n")
                ticket.finished = True
            await response.write(b"".join(events))
            continue
        texts = [t.text for t in batch if not t.special and t.text]
        if calls is not None:
            texts = [text for text in map(calls.feed, texts) if text]
        events = [chunk(text, None) for text in texts]
        if batch[-1].finish_reason:
            finish = _FINISH[batch[-1].finish_reason]
            if calls is not None:
                content, items = calls.finish()
                events += [chunk(content, None)] if content else []
                events += [chunk(None, None, tool_call=item) for item in items]
                finish = "tool_calls" if items else finish
            events.append(chunk(None, finish))
            if include_usage:
                events.append(sse({**head, "choices": [], "usage": _usage(len(prompt), generated)}, b"data: "))
            events.append(b"data: [DONE]\n\n")
            ticket.finished = True
        if events:
            await response.write(b"".join(events))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, chat=False)


async def models(request: web.Request) -> web.Response:
    backend = backend_of(request)
    engine, cfg = backend.engine, backend.config
    base = {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "devbackend",
            "root": cfg.model or engine.model_id, "parent": None, "max_model_len": cfg.max_total_tokens}
    data = [base]
    if cfg.flavor != "tgi":  # TGI lists only the base model
        data += [{"id": name, "object": "model", "created": 0, "owned_by": "devbackend", "root": path,
                  "parent": engine.model_id, "max_model_len": cfg.max_total_tokens}
                 for name, path in sorted(engine.adapters.items())]
    return web.json_response({"object": "list", "data": data})


async def load_lora_adapter(request: web.Request) -> web.Response:
    backend = backend_of(request)
    try:
        body = await read_json(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise BackendError(400, "Both 'lora_name' and 'lora_path' must be provided.", "BadRequestError")
        if name in backend.engine.adapters:
            raise BackendError(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        await backend.engine.load_adapter(name, path)
    except BackendError as error:
        return openai_error(backend, error)
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    backend = backend_of(request)
    try:
        body = await read_json(request)
        name = body.get("lora_name")
        if name not in backend.engine.adapters:
            raise BackendError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        await backend.engine.unload_adapter(name)
    except BackendError as error:
        return openai_error(backend, error)
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def add_routes(app: web.Application, runtime_lora: bool) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    if runtime_lora:
        app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
        app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
