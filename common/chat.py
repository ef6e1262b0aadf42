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
