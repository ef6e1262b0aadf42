"""Client request validation and the rewrite into a backend request.

Nothing the client sends is forwarded as is: the backend request is built field by field from what is
validated here, so client fields that could pick adapters or backends (`adapter_id` outside /generate's
model selection, `adapter_source`, `cache_salt`, `lora_request`, …) never reach a backend.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

from serving.config import Route, TenantEntry
from serving.drivers import BackendRequest, Sampling
from serving.drivers.base import ContextOverflow
from serving.gateway.endpoints import CHAT, COMPLETIONS, GENERATE, GENERATE_STREAM, Endpoint
from serving.gateway.errors import bad_request, context_length_exceeded
from serving.tokencount import PromptCount
from common.chat import inject_system_prompt
from common.parsers import JsonRefused, json_depth_exceeds, json_loads, too_deep

CHAT_ROLES = {"system", "user", "assistant", "developer", "tool"}
FUNCTION_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
TOOL_CHOICES = ("none", "auto", "required")


@dataclass(slots=True)
class ClientRequest:
    endpoint: Endpoint  # CHAT | COMPLETIONS | GENERATE | GENERATE_STREAM
    model: str | None
    stream: bool = False
    include_usage: bool = False
    messages: list[dict] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float | None = None  # OpenAI's additive penalties, -2…2; None for 0 (no penalty)
    frequency_penalty: float | None = None
    do_sample: bool | None = None
    details: bool = False
    return_full_text: bool = False
    echo: bool = False  # /v1/completions: the client's prompt before the text
    tools: list[dict] | None = None  # validated, rebuilt function definitions (chat only)
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None


def parse_json(body: bytes) -> dict:
    """The body's JSON object. Nesting deeper than MAX_JSON_DEPTH (400 `json_too_deep`) and lone UTF-16 surrogates
    (400 `invalid_unicode`, `param` the field) are refused here, before admission: nothing is counted for them."""
    try:
        data = json_loads(body)
    except JsonRefused as exc:
        raise bad_request(exc.message, exc.param, exc.code) from None
    except ValueError:  # UnicodeDecodeError included
        raise bad_request("The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The body must be a JSON object.", code="invalid_json")
    return data


INT64 = (-(2**63), 2**63 - 1)  # OpenAI's (and vLLM's) seed
UINT64 = (0, 2**64 - 1)  # TGI's seed
INT32_MAX = 2**31 - 1  # TGI's top_k


def _json_type(value) -> str:
    return ("null" if value is None else "a boolean" if isinstance(value, bool) else "an integer" if isinstance(value, int)
            else "a decimal" if isinstance(value, float) else "an object" if isinstance(value, dict)
            else "an array" if isinstance(value, list) else "a string")


def _out_of_range(param: str, kind: str, value, lo, hi, *, lo_open: bool = False):
    """OpenAI's wording ("Invalid 'top_p': decimal above maximum value. Expected a value from 0 to 1, but got 1.5 instead.")."""
    if lo is not None and hi is not None and not lo_open:
        expected = f"from {lo} to {hi}"
    else:
        expected = " and ".join(filter(None, (lo is not None and (f"> {lo}" if lo_open else f">= {lo}"), hi is not None and f"<= {hi}")))
    where = "above maximum" if hi is not None and value > hi else "below minimum"
    return bad_request(f"Invalid '{param}': {kind} {where} value. Expected a value {expected}, but got {value} instead.", param)


def _int(data: dict, name: str, *, minimum: int | None = None, maximum: int | None = None,
         param: str | None = None) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    param = param or name
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"Invalid type for '{param}': expected an integer, but got {_json_type(value)} instead.", param, "invalid_type")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _out_of_range(param, "integer", value, minimum, maximum)
    return value


def _number(data: dict, name: str, lo: float, hi: float, *, lo_open: bool = False, param: str | None = None) -> float | None:
    """A number in [lo, hi] (or (lo, hi] with `lo_open`); NaN and infinities are out of every range."""
    value = data.get(name)
    if value is None:
        return None
    param = param or name
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"Invalid type for '{param}': expected a number, but got {_json_type(value)} instead.", param, "invalid_type")
    if not (lo < value <= hi if lo_open else lo <= value <= hi):
        raise _out_of_range(param, "decimal", value, lo, hi, lo_open=lo_open)
    return float(value)


def _top_p(data: dict, *, param: str | None = None) -> float | None:
    """OpenAI's 0 <= top_p <= 1. TGI takes only 0 < top_p < 1 and vLLM 0 < top_p <= 1, so 1 (no nucleus cut) is
    not sent at all, and 0 (only the most likely token) is greedy decoding (`sampling_for`)."""
    top_p = _number(data, "top_p", 0, 1, param=param)
    return None if top_p == 1 else top_p


def _bool(data: dict, name: str, *, param: str | None = None) -> bool | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise bad_request(f"`{name}` must be true or false.", param or name, "invalid_type")
    return value


def _stop(data: dict, name: str = "stop", *, param: str | None = None) -> list[str]:
    value = data.get(name)
    if value is None:
        return []
    param = param or name
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad_request(f"Invalid type for '{param}': expected a string or an array of strings.", param, "invalid_type")
    if len(value) > 4:  # OpenAI's limit, and TGI's default max_stop_sequences
        raise bad_request(f"Invalid '{param}': array too long. Expected an array with maximum length 4, but got an array "
                          f"with length {len(value)} instead.", param)
    return [s for s in value if s]


def _model(data: dict) -> str | None:
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("`model` must be a string.", "model", "invalid_type")
    return model or None


# Features the gateway does not carry to backends yet. Dropping them silently would answer a different question
# (no tool call, no JSON schema), so a request that asks for one is refused, naming it. Values that
# ask for nothing pass: None, false, 0, "", [], {} and the ones listed in _HARMLESS.
_NO_LOGPROBS = "Log probabilities are not returned on /v1 yet; use /generate with `details: true` for token logprobs."
_UNSUPPORTED = {
    "functions": "The legacy `functions` parameter is not supported; declare them in `tools` instead.",
    "function_call": "The legacy `function_call` parameter is not supported; use `tool_choice` instead.",
    "logprobs": _NO_LOGPROBS,
    "top_logprobs": _NO_LOGPROBS,
    "response_format": "Only `response_format: {\"type\": \"text\"}` is supported; JSON mode and JSON schemas are not yet.",
    "logit_bias": "`logit_bias` is not supported yet.",
    "best_of": "`best_of` is not supported (only 1).",
    "suffix": "`suffix` (insertion) is not supported.",
}
# TGI's `parameters` the gateway does not carry (huggingface_hub's InferenceClient sends some with their defaults).
_TGI_UNSUPPORTED = ("best_of", "decoder_input_details", "grammar", "repetition_penalty", "top_n_tokens",
                    "truncate", "typical_p", "watermark")
_HARMLESS = {"response_format": ({"type": "text"},), "best_of": (1,), "repetition_penalty": (1,), "typical_p": (1,)}


def _refuse_unsupported(data: dict, names, *, prefix: str = "") -> None:
    for name in names:
        value = data.get(name)
        if value in (None, False, "", [], {}) or value in _HARMLESS.get(name, ()):  # 0 == False, 1.0 == 1
            continue
        param = prefix + name
        message = _UNSUPPORTED.get(name) if not prefix else f"`{param}` is not supported by this gateway yet."
        raise bad_request(message, param, "unsupported_parameter")


def _object(value, param: str, keys: set[str], required: tuple[str, ...] = ()) -> dict:
    """A JSON object with only the known `keys` (an unknown one is refused: it would be dropped otherwise)."""
    if not isinstance(value, dict):
        raise bad_request(f"`{param}` must be an object.", param, "invalid_type")
    for key in value:
        if key not in keys:
            raise bad_request(f"`{param}.{key}` is not a known field (expected {', '.join(sorted(keys))}).", f"{param}.{key}", "unknown_parameter")
    for key in required:
        if value.get(key) is None:
            raise bad_request(f"`{param}.{key}` is required.", f"{param}.{key}", "missing_required_parameter")
    return value


def _function_name(value, param: str) -> str:
    if not isinstance(value, str) or not FUNCTION_NAME_RE.match(value):
        raise bad_request(f"`{param}` must be 1 to 64 letters, digits, underscores or dashes.", param,
                          "invalid_type" if not isinstance(value, str) else "invalid_value")
    return value


def _function_type(value: dict, param: str) -> None:
    if value.get("type") != "function":
        raise bad_request(f"`{param}.type` must be \"function\".", f"{param}.type", "invalid_value")


def _tools(data: dict) -> list[dict] | None:
    """OpenAI's `tools`, rebuilt: [{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}]."""
    tools = data.get("tools")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise bad_request("`tools` must be a list of function definitions.", "tools", "invalid_type")
    if len(tools) > 128:
        raise bad_request("`tools` may declare at most 128 functions.", "tools")
    out, names = [], set()
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        _object(tool, param, {"type", "function"}, ("type", "function"))
        _function_type(tool, param)
        fn = _object(tool["function"], f"{param}.function", {"name", "description", "parameters", "strict"}, ("name",))
        name = _function_name(fn["name"], f"{param}.function.name")
        if name in names:
            raise bad_request(f"The function `{name}` is declared twice in `tools`.", f"{param}.function.name")
        names.add(name)
        clean: dict = {"name": name}
        if fn.get("description") is not None:
            if not isinstance(fn["description"], str):
                raise bad_request(f"`{param}.function.description` must be a string.", f"{param}.function.description", "invalid_type")
            clean["description"] = fn["description"]
        if fn.get("parameters") is not None:
            if not isinstance(fn["parameters"], dict):
                raise bad_request(f"`{param}.function.parameters` must be a JSON Schema object.", f"{param}.function.parameters", "invalid_type")
            clean["parameters"] = fn["parameters"]
        strict = _bool(fn, "strict", param=f"{param}.function.strict")
        if strict is not None:
            clean["strict"] = strict
        out.append({"type": "function", "function": clean})
    return out


def _tool_choice(data: dict, tools: list[dict] | None) -> str | dict | None:
    choice = data.get("tool_choice")
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise bad_request(f"`tool_choice` must be one of {', '.join(TOOL_CHOICES)} or a function.", "tool_choice")
        if choice != "none" and tools is None:
            raise bad_request(f"`tool_choice: \"{choice}\"` needs `tools`.", "tool_choice")
        return choice
    _object(choice, "tool_choice", {"type", "function"}, ("type", "function"))
    _function_type(choice, "tool_choice")
    fn = _object(choice["function"], "tool_choice.function", {"name"}, ("name",))
    name = _function_name(fn["name"], "tool_choice.function.name")
    if not any(t["function"]["name"] == name for t in tools or ()):
        raise bad_request(f"`tool_choice` names the function `{name}`, which `tools` does not declare.", "tool_choice.function.name")
    return {"type": "function", "function": {"name": name}}


def _text_content(m: dict, param: str, *, parts: tuple[str, ...] = ("text",), hint: str = "") -> str:
    """A message's `content`: a string, or content parts of the given types (`{"type": "text", "text"}`,
    `{"type": "refusal", "refusal"}`) joined: only text reaches a text model."""
    if "content" not in m:
        raise bad_request(f"`{param}` is required{hint}.", param, "missing_required_parameter")
    content = m["content"]
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in parts or not isinstance(part.get(kind), str):
                raise bad_request(f"`{param}` parts must be {' or '.join(parts)} parts.", param, "invalid_type")
            texts.append(part[kind])
        content = "".join(texts)
    if not isinstance(content, str):
        raise bad_request(f"Invalid value for `{param}`: expected a string or a list of {' or '.join(parts)} parts, "
                          f"got {_json_type(content)}{hint}.", param, "invalid_type")
    return content


def _assistant_content(m: dict, param: str, has_calls: bool) -> str | None:
    """OpenAI's rule: content may be null or absent only beside `tool_calls`; a `refusal` is what the assistant
    said, so it is carried as (the end of) its content."""
    refusal = m.get("refusal")
    if refusal is not None and not isinstance(refusal, str):
        raise bad_request(f"`{param}.refusal` must be a string.", f"{param}.refusal", "invalid_type")
    if m.get("content") is None and (has_calls or refusal is not None):
        return refusal
    content = _text_content(m, f"{param}.content", parts=("text", "refusal"),
                            hint=" (an assistant message may leave it out only when it has `tool_calls`)")
    return content + refusal if refusal else content


def _tool_calls(calls, param: str) -> list[dict]:
    """An assistant message's `tool_calls`, rebuilt: [{"id", "type": "function", "function": {"name", "arguments"}}]."""
    if not isinstance(calls, list) or not calls:
        raise bad_request(f"`{param}` must be a non-empty list.", param, "invalid_type")
    out = []
    for j, call in enumerate(calls):
        p = f"{param}[{j}]"
        _object(call, p, {"id", "type", "function"}, ("id", "type", "function"))
        _function_type(call, p)
        if not isinstance(call["id"], str) or not call["id"]:
            raise bad_request(f"`{p}.id` must be a non-empty string.", f"{p}.id", "invalid_type")
        fn = _object(call["function"], f"{p}.function", {"name", "arguments"}, ("name", "arguments"))
        if not isinstance(fn["arguments"], str):
            raise bad_request(f"`{p}.function.arguments` must be a string (JSON text).", f"{p}.function.arguments", "invalid_type")
        if json_depth_exceeds(fn["arguments"].encode("utf-8", "surrogatepass")):  # parsed again by the prompt count and the backends
            raise bad_request(too_deep(what=f"`{p}.function.arguments`").message, f"{p}.function.arguments", "json_too_deep")
        out.append({"id": call["id"], "type": "function",
                    "function": {"name": _function_name(fn["name"], f"{p}.function.name"), "arguments": fn["arguments"]}})
    return out


def _chat_message(m, i: int, open_calls: set[str]) -> dict:
    """One message, rebuilt. `open_calls`: ids of the latest assistant tool calls that tool messages may answer."""
    if isinstance(m, dict) and m.get("role") == "function":
        raise bad_request(f"`messages[{i}]` has the legacy role `function`; answer tool calls with role `tool`.",
                          f"messages[{i}].role", "unsupported_parameter")
    if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
        raise bad_request(f"`messages[{i}].role` must be one of {sorted(CHAT_ROLES)}.", f"messages[{i}].role")
    role, p = m["role"], f"messages[{i}]"
    if m.get("function_call") is not None:
        raise bad_request(f"`{p}.function_call` is the legacy form of `tool_calls`, which is not supported; use `tool_calls`.",
                          f"{p}.function_call", "unsupported_parameter")
    if role != "assistant" and m.get("refusal") is not None:
        raise bad_request(f"`{p}.refusal` is only allowed on assistant messages.", f"{p}.refusal")
    if role == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise bad_request(f"`{p}.tool_call_id` is required for a tool message.", f"{p}.tool_call_id",
                              "missing_required_parameter" if call_id is None else "invalid_type")
        if call_id not in open_calls:
            raise bad_request(f"`{p}` answers the tool call `{call_id}`, which no preceding assistant message made.",
                              f"{p}.tool_call_id")
        out = {"role": "tool", "tool_call_id": call_id, "content": _text_content(m, f"{p}.content")}
    else:
        if m.get("tool_call_id") is not None:
            raise bad_request(f"`{p}.tool_call_id` is only allowed on tool messages.", f"{p}.tool_call_id")
        open_calls.clear()
        calls = m.get("tool_calls")
        if calls is not None and calls != []:
            if role != "assistant":
                raise bad_request(f"`{p}.tool_calls` is only allowed on assistant messages.", f"{p}.tool_calls")
            calls = _tool_calls(calls, f"{p}.tool_calls")
            open_calls.update(c["id"] for c in calls)
        else:
            calls = None
        if role == "assistant":
            out = {"role": "assistant", "content": _assistant_content(m, p, calls is not None)}
            if calls is not None:
                out["tool_calls"] = calls
        else:
            out = {"role": "system" if role == "developer" else role, "content": _text_content(m, f"{p}.content")}
    name = m.get("name")  # the participant's name: carried (TGI and vLLM take it; chat templates may render it)
    if name is not None:
        if not isinstance(name, str):
            raise bad_request(f"`{p}.name` must be a string.", f"{p}.name", "invalid_type")
        if name:
            out["name"] = name
    return out


def _openai_common(data: dict, req: ClientRequest) -> None:
    req.presence_penalty = _number(data, "presence_penalty", -2, 2) or None
    req.frequency_penalty = _number(data, "frequency_penalty", -2, 2) or None
    _refuse_unsupported(data, _UNSUPPORTED)
    if req.endpoint is not CHAT:
        for name in ("tools", "tool_choice", "parallel_tool_calls"):
            if data.get(name) not in (None, [], "none"):
                raise bad_request(f"`{name}` is only supported on /v1/chat/completions.", name, "unsupported_parameter")
    req.stream = bool(_bool(data, "stream"))
    options = data.get("stream_options")
    if options is not None:
        if not req.stream:  # OpenAI's rule and wording: the options would silently not apply
            raise bad_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
        if not isinstance(options, dict):
            raise bad_request("`stream_options` must be an object.", "stream_options", "invalid_type")
        req.include_usage = bool(_bool(options, "include_usage", param="stream_options.include_usage"))
    n = _int(data, "n", minimum=1, maximum=128)
    if n not in (None, 1):
        raise bad_request("Only n=1 is supported.", "n")
    req.temperature = _number(data, "temperature", 0, 2)
    req.top_p = _top_p(data)
    req.seed = _int(data, "seed", minimum=INT64[0], maximum=INT64[1])
    req.stop = _stop(data)


def parse_chat(data: dict) -> ClientRequest:
    req = ClientRequest(CHAT, _model(data))
    messages = data.get("messages")
    if messages is None:
        raise bad_request("`messages` is required.", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list.", "messages", "invalid_type")
    if data.get("echo") not in (None, False):
        raise bad_request("`echo` is only supported on /v1/completions.", "echo", "unsupported_parameter")
    open_calls: set[str] = set()
    req.messages = [_chat_message(m, i, open_calls) for i, m in enumerate(messages)]
    _openai_common(data, req)
    req.tools = _tools(data)
    req.tool_choice = _tool_choice(data, req.tools)
    req.parallel_tool_calls = _bool(data, "parallel_tool_calls")
    req.max_tokens = _int(data, "max_completion_tokens", minimum=1)
    if req.max_tokens is None:
        req.max_tokens = _int(data, "max_tokens", minimum=1)
    return req


def parse_completions(data: dict) -> ClientRequest:
    req = ClientRequest(COMPLETIONS, _model(data))
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise bad_request("`prompt` is required.", "prompt", "missing_required_parameter")
    if not isinstance(prompt, str):
        raise bad_request("`prompt` must be a string.", "prompt", "invalid_type")
    req.prompt = prompt
    _openai_common(data, req)
    req.echo = bool(_bool(data, "echo"))
    req.max_tokens = _int(data, "max_tokens", minimum=1)
    return req


def parse_generate(data: dict, *, stream: bool) -> ClientRequest:
    """TGI's /generate and /generate_stream (and POST / with `stream`). The model is `parameters.adapter_id`."""
    inputs = data.get("inputs")
    if inputs is None:
        raise bad_request("`inputs` is required.", "inputs", "missing_required_parameter")
    if not isinstance(inputs, str) or not inputs:
        raise bad_request("`inputs` must be a non-empty string.", "inputs", "invalid_type")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad_request("`parameters` must be an object.", "parameters", "invalid_type")
    adapter = params.get("adapter_id")
    if adapter is not None and not isinstance(adapter, str):
        raise bad_request("`parameters.adapter_id` must be a string.", "parameters.adapter_id", "invalid_type")
    req = ClientRequest(GENERATE_STREAM if stream else GENERATE, adapter or _model(data), stream=stream)
    _refuse_unsupported(params, _TGI_UNSUPPORTED, prefix="parameters.")
    req.prompt = inputs
    req.max_tokens = _int(params, "max_new_tokens", minimum=1, param="parameters.max_new_tokens")
    req.temperature = _number(params, "temperature", 0, 100, lo_open=True, param="parameters.temperature")
    req.top_p = _top_p(params, param="parameters.top_p")
    req.top_k = _int(params, "top_k", minimum=1, maximum=INT32_MAX, param="parameters.top_k")
    req.seed = _int(params, "seed", minimum=UINT64[0], maximum=UINT64[1], param="parameters.seed")
    req.stop = _stop(params, param="parameters.stop")
    req.frequency_penalty = _number(params, "frequency_penalty", -2, 2, param="parameters.frequency_penalty") or None
    req.do_sample = _bool(params, "do_sample", param="parameters.do_sample")
    req.details = bool(_bool(params, "details", param="parameters.details"))
    req.return_full_text = bool(_bool(params, "return_full_text", param="parameters.return_full_text"))
    return req


def parse_request(endpoint: Endpoint, data: dict) -> ClientRequest:
    """The body of an inference route, validated (`endpoint` resolved: never TGI's POST /, see `Endpoint.resolve`)."""
    if endpoint is CHAT:
        return parse_chat(data)
    if endpoint is COMPLETIONS:
        return parse_completions(data)
    return parse_generate(data, stream=endpoint is GENERATE_STREAM)


def resolve_max_tokens(req: ClientRequest, tenant: TenantEntry, context_length: int) -> int:
    """The request's max tokens, else the tenant's default; above the cap or the context → 400."""
    max_tokens = req.max_tokens if req.max_tokens is not None else min(tenant.default_max_tokens, max(1, context_length - 1))
    param = req.endpoint.max_tokens_param
    if max_tokens > tenant.max_max_tokens:
        raise bad_request(f"`{param}` is {max_tokens}; your tenant's limit is {tenant.max_max_tokens} "
                          "(console: Models › Max max tokens).", param)
    if max_tokens >= context_length:
        raise bad_request(f"`{param}` is {max_tokens}; the model's context is {context_length} tokens, prompt included.", param)
    return max_tokens


def sampling_for(req: ClientRequest, tenant: TenantEntry) -> Sampling:
    """Explicit sampling: temperature clamped to the tenant's maximum; greedy when it is 0 or do_sample is false."""
    if req.endpoint.tgi:
        do_sample = bool(req.do_sample) or (req.do_sample is None and req.temperature is not None)
        temperature = req.temperature if req.temperature is not None else tenant.default_temperature
    else:
        temperature = req.temperature if req.temperature is not None else tenant.default_temperature
        do_sample = temperature > 0
    temperature = min(temperature, tenant.max_temperature)
    if temperature <= 0 or req.top_p == 0:  # top_p=0 keeps only the most likely token: greedy
        do_sample = False
    penalties = dict(presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty)  # greedy too
    if not do_sample:
        return Sampling(False, seed=req.seed, stop=req.stop, **penalties)
    return Sampling(True, temperature, req.top_p, req.top_k, req.seed, req.stop, **penalties)


def build_backend_request(req: ClientRequest, tenant: TenantEntry, route: Route, pool, max_tokens: int) -> BackendRequest:
    sampling = sampling_for(req, tenant)
    if pool.kind in ("tgi", "dev") and req.endpoint is not CHAT and sampling.presence_penalty is not None:
        # Text prompts go to TGI's /generate (TGI and dev pools): a frequency penalty, no presence penalty there.
        raise bad_request("`presence_penalty` is not supported for text completions on this model's backend (TGI's /generate); use "
                          "`frequency_penalty`, or /v1/chat/completions.", "presence_penalty", "unsupported_parameter")
    # A merged model (route.model_id) is the backends' model itself: no adapter on top of it.
    common = dict(max_tokens=max_tokens, sampling=sampling, adapter=None if route.model_id else route.adapter,
                  model_id=route.model_id or pool.hf_id,
                  cache_salt=tenant.cache_salt if pool.kind == "vllm" else None, want_tokens=req.details or req.endpoint is GENERATE_STREAM)
    if req.endpoint is CHAT:
        tools = dict(tools=req.tools, tool_choice=req.tool_choice,
                     parallel_tool_calls=req.parallel_tool_calls) if req.tools is not None else {}
        return BackendRequest("chat", messages=inject_system_prompt(req.messages, tenant.system_prompt, tenant.system_message_rule),
                              **tools, **common)
    prompt = f"{tenant.system_prompt}\n\n{req.prompt}" if tenant.system_prompt else req.prompt
    return BackendRequest("text", prompt=prompt, **common)


COUNT_INLINE_CHARS = 4096  # longer prompts are counted in a worker thread (about 1 ms of tokenizing and more)


def _count(backend_request: BackendRequest, pool) -> PromptCount:
    counter = pool.counter
    beyond = pool.context_length  # far past it, an exact counter gives a lower bound without tokenizing
    if backend_request.kind == "chat":
        return counter.chat(backend_request.messages, backend_request.tools, kind=pool.kind, beyond=beyond)
    return counter.text(backend_request.prompt, kind=pool.kind, beyond=beyond)


async def count_prompt(backend_request: BackendRequest, pool) -> PromptCount:
    """The prompt's tokens as the pool's backends will count them (system prompt, chat template and tools included):
    exact with the base model's tokenizer here, else an upper bound (serving.tokencount). A long prompt is counted
    in a worker thread, so the event loop serves other requests meanwhile (the tokenizer releases the GIL)."""
    if backend_request.kind == "chat":
        size = sum(len(m["content"] or "") for m in backend_request.messages)
    else:
        size = len(backend_request.prompt or "")
    if size < COUNT_INLINE_CHARS or not pool.counter.exact:
        return _count(backend_request, pool)
    return await asyncio.to_thread(_count, backend_request, pool)


def fit_context(req: ClientRequest, backend_request: BackendRequest, prompt: PromptCount, context_length: int) -> int:
    """The max tokens that go with this prompt. An exact prompt + max tokens beyond the context is refused here, as
    OpenAI refuses it (400 `context_length_exceeded`, its figures exact), before any backend is called; a default
    max tokens (the client asked for none) is shortened to what fits. With a bound, the backend decides."""
    max_tokens = backend_request.max_tokens
    if prompt.at_least:  # a lower bound already past the context (serving.tokencount.PromptCounter.at_least)
        raise context_length_exceeded(req.endpoint, ContextOverflow(context_length, prompt.tokens, input_at_least=True),
                                      max_tokens)
    if not prompt.exact or prompt.tokens + max_tokens <= context_length:
        return max_tokens
    room = context_length - prompt.tokens
    if req.max_tokens is None and room >= 1:
        backend_request.max_tokens = room
        return room
    asked = max_tokens if req.max_tokens is not None else None  # the prompt alone is too long: say so without Y
    raise context_length_exceeded(req.endpoint, ContextOverflow(context_length, prompt.tokens, asked), max_tokens)


def reservation_tokens(prompt: PromptCount, max_tokens: int, context_length: int) -> int:
    """What admission reserves: prompt + max tokens, an upper bound of what the request can use (a backend never
    uses more than the context, so a bound is capped there)."""
    total = prompt.tokens + max_tokens
    return total if prompt.exact else min(total, context_length)
