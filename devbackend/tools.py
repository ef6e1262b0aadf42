"""Tool calling as vLLM serves it with `--enable-auto-tool-choice --tool-call-parser ...`, for the tiny model's
template: `tools` and tool messages go through the chat template, and generated `<|tool_call|>{"name": ...,
"arguments": {...}}` text comes back as OpenAI `tool_calls` (content before the first call stays content).

Streaming works like vLLM's parsers: text is sent as content until it could be the start of a call marker; from
the marker on it is held, and at the end each call is sent as `delta.tool_calls` (id, type and name first, then
the arguments). Text after the marker that does not parse as calls is sent as content after all.
"""

from __future__ import annotations

import json
import uuid

from common.chat import template_message

from .protocol import validation_error

CALL_MARKER = "<|tool_call|>"


def tools_of(body: dict) -> tuple[list | None, bool]:
    """(`tools` for the template, whether generated calls are parsed). `tool_choice: "none"` never returns calls."""
    tools = body.get("tools")
    if tools is None or tools == []:
        return None, False
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools):
        raise validation_error("`tools` must be a list of {\"type\": \"function\", \"function\": {...}}")
    return tools, body.get("tool_choice") != "none"


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates take them: tool-call arguments as dicts (common.chat, as the trainer renders them)."""
    return [template_message(m) for m in messages]


def _new_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(content, tool_calls) of a generated answer; no calls when the text after the first marker is not a
    sequence of `<|tool_call|>{"name": str, "arguments": object}` (then it all stays content)."""
    at = text.find(CALL_MARKER)
    if at == -1:
        return text, []
    decoder, calls, pos = json.JSONDecoder(), [], at
    while pos < len(text):
        if not text.startswith(CALL_MARKER, pos):
            if text[pos:].strip():
                return text, []
            break
        try:
            value, end = decoder.raw_decode(text, pos + len(CALL_MARKER))
        except ValueError:
            return text, []
        name, arguments = (value.get("name"), value.get("arguments", {})) if isinstance(value, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(arguments, (dict, str)):
            return text, []
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append({"id": _new_id(), "type": "function", "function": {"name": name, "arguments": arguments}})
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return text[:at], calls


class ToolCallStream:
    """Per streamed answer: `feed(text)` gives the content to send now, `finish()` the tail as
    (content, tool-call delta items in vLLM's shape)."""

    def __init__(self):
        self.held = ""
        self.in_call = False

    def feed(self, text: str) -> str:
        self.held += text
        if self.in_call:
            return ""
        at = self.held.find(CALL_MARKER)
        if at != -1:
            self.in_call = True
            out, self.held = self.held[:at], self.held[at:]
            return out
        keep = next((n for n in range(min(len(CALL_MARKER) - 1, len(self.held)), 0, -1)
                     if CALL_MARKER.startswith(self.held[-n:])), 0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def finish(self) -> tuple[str, list[dict]]:
        content, calls = parse_tool_calls(self.held)
        items = []
        for index, call in enumerate(calls):
            items.append({"id": call["id"], "type": "function", "index": index, "function": {"name": call["function"]["name"]}})
            items.append({"index": index, "function": {"arguments": call["function"]["arguments"]}})
        return content, items
