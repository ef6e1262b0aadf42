"""Chat messages as chat templates take them (transformers' documented shape), shared by the trainer, the dataset
validator and the dev backend so that training and serving render a conversation the same way."""

from __future__ import annotations

import json
from typing import Any


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as chat templates take it: no `weight`; tool-call arguments as a dict (transformers' documented
    shape, which templates serialise themselves) instead of OpenAI's JSON string."""
    out = {k: v for k, v in message.items() if k != "weight"}
    if out.get("tool_calls"):
        out["tool_calls"] = [_template_call(call) for call in out["tool_calls"]]
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    return {**call, "function": {**call["function"], "arguments": arguments}}


def inject_system_prompt(messages: list[dict], system_prompt: str, rule: str) -> list[dict]:
    """The tenant's system prompt as the gateway serves it (and the trainer and evaluations train and score with it).

    Ours first. `keep`: the user's leading system message is appended to ours (one system message, so
    templates that accept a single system turn still work); `replace`: the user's system messages are dropped."""
    if not system_prompt:
        return messages
    if rule == "replace":
        rest = [m for m in messages if m["role"] != "system"]
        return [{"role": "system", "content": system_prompt}, *rest]
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{system_prompt}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": system_prompt}, *messages]
