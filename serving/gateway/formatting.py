"""Answers in the shape the client asked for: OpenAI chat / completions (bodies and SSE chunks) and TGI.

The gateway uses its own ids and the tenant-visible model name; nothing of the backend's answer (its id,
adapter path, base model id) is passed through.
"""

from __future__ import annotations

import json
import secrets

from serving.drivers import Finish, TokenDelta, ToolCallDelta

_dumps = json.dumps
TGI_FINISH = {"stop": "eos_token", "length": "length"}


def _tgi_finish(finish: Finish) -> str:
    return "stop_sequence" if finish.stop_sequence else TGI_FINISH.get(finish.finish_reason, "eos_token")


def usage_dict(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class OpenAIFormat:
    """chat.completion(.chunk) or text_completion, streamed with `data: [DONE]` at the end.

    `echo` (completions): the client's own prompt, put before the text (with the first text chunk when streaming)."""

    def __init__(self, *, chat: bool, request_id: str, created: int, model: str, include_usage: bool, echo: str = ""):
        self.chat = chat
        self.echo = echo
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = f'data: {{"id":{_dumps(self.id)},"object":"{obj}","created":{created},"model":{_dumps(model)},'
        self._head = head
        self._first = True
        self.text_parts: list[str] = []

    def delta(self, d: TokenDelta) -> bytes | None:
        if not d.text:
            return None
        if self.chat:
            role = '"role":"assistant",' if self._first else ""
            self._first = False
            return (self._head + f'"choices":[{{"index":0,"delta":{{{role}"content":{_dumps(d.text)}}},"logprobs":null,"finish_reason":null}}]}}\n\n').encode()
        text = d.text
        if self.echo:
            text, self.echo = self.echo + text, ""
        return (self._head + f'"choices":[{{"index":0,"text":{_dumps(text)},"logprobs":null,"finish_reason":null}}]}}\n\n').encode()

    def tool_calls(self, items: list[dict]) -> bytes:
        """A chunk with `delta.tool_calls` (items as `ToolCalls.feed` gives them)."""
        role = '"role":"assistant","content":null,' if self._first else ""
        self._first = False
        return (self._head + f'"choices":[{{"index":0,"delta":{{{role}"tool_calls":{_dumps(items)}}},"logprobs":null,"finish_reason":null}}]}}\n\n').encode()

    def end(self, finish: Finish, prompt_tokens: int, completion_tokens: int) -> bytes:
        if self.chat:
            delta = '{"role":"assistant","content":""}' if self._first else "{}"
            out = self._head + f'"choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":"{finish.finish_reason}"}}]}}\n\n'
        else:
            out = self._head + f'"choices":[{{"index":0,"text":{_dumps(self.echo)},"logprobs":null,"finish_reason":"{finish.finish_reason}"}}]}}\n\n'
        if self.include_usage:
            out += self._head + f'"choices":[],"usage":{_dumps(usage_dict(prompt_tokens, completion_tokens))}}}\n\n'
        return (out + "data: [DONE]\n\n").encode()

    @staticmethod
    def error_event(message: str, type_: str, code: str | None) -> bytes:
        return ("data: " + _dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}) + "\n\n").encode()

    def body(self, text: str, finish: Finish, prompt_tokens: int, completion_tokens: int, tool_calls: list[dict] | None = None) -> bytes:
        if self.chat:
            message = {"role": "assistant", "content": text}
            if tool_calls:
                message = {"role": "assistant", "content": text or None, "tool_calls": tool_calls}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": self.echo + text, "logprobs": None, "finish_reason": finish.finish_reason}
            obj = "text_completion"
        return _dumps({"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                       "usage": usage_dict(prompt_tokens, completion_tokens)}).encode()


class ToolCalls:
    """One answer's tool calls: fragments merged by index, gateway call ids (`call_<hex>`; the backend's are
    not passed on), and the tenant's output guard on the arguments.

    Streaming without a guard, every fragment goes out at once in OpenAI's shape (the first of a call with its
    id, type and name). With a guard, a call's arguments are held until the call is complete (the next call
    starts, or the answer ends) and redacted whole as JSON (`OutputGuard.apply_json`), then sent as one fragment."""

    def __init__(self, guard=None):
        self.guard = guard
        self.calls: dict[int, dict] = {}  # index -> {"id", "name", "arguments", "sent"}

    def feed(self, d: ToolCallDelta) -> list[dict]:
        """What to stream now: a list of `delta.tool_calls` items, possibly empty."""
        call = self.calls.get(d.index)
        new = call is None
        if new:
            call = self.calls[d.index] = {"id": "call_" + secrets.token_hex(12), "name": "", "arguments": "", "sent": False}
        named = bool(d.name) and not call["name"]
        if named:
            call["name"] = d.name
        call["arguments"] += d.arguments
        if self.guard is not None:
            return self._release(keep=d.index) if new else []
        item: dict = {"index": d.index}
        if new:
            item.update(id=call["id"], type="function")
        fn = {"name": d.name} if named else {}
        if new or d.arguments:
            fn["arguments"] = d.arguments
        if fn:
            item["function"] = fn
        return [item]

    def finish(self) -> list[dict]:
        """What is still held at the end (guarded streams)."""
        return self._release(keep=None) if self.guard is not None else []

    def _release(self, keep: int | None) -> list[dict]:
        out = []
        for index in sorted(self.calls):
            call = self.calls[index]
            if index == keep or call["sent"]:
                continue
            call["sent"] = True
            out.append({"index": index, "id": call["id"], "type": "function",
                        "function": {"name": call["name"], "arguments": self._arguments(call)}})
        return out

    def _arguments(self, call: dict) -> str:
        return self.guard.apply_json(call["arguments"]) if self.guard is not None else call["arguments"]

    def message(self) -> list[dict] | None:
        """`message.tool_calls` of a non-streamed answer."""
        if not self.calls:
            return None
        return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": self._arguments(c)}}
                for _, c in sorted(self.calls.items())]


class TGIFormat:
    """/generate and /generate_stream. The final token event carries `generated_text` and `details`, so the
    token the backend marks as last is held back until the finish (and the ledger write) is known."""

    def __init__(self, *, details: bool, client_prompt: str, return_full_text: bool):
        self.details = details
        self.prefix = client_prompt if return_full_text else ""  # the client's prompt, never our system prompt
        self.index = 0
        self.tokens: list[dict] = []
        self.text_parts: list[str] = []
        self._held: dict | None = None

    def _token(self, d: TokenDelta) -> dict:
        if d.token is not None:
            return {"id": d.token.get("id", 0), "text": d.token.get("text", d.text), "logprob": d.token.get("logprob", 0.0),
                    "special": bool(d.token.get("special", False))}
        return {"id": 0, "text": d.text, "logprob": 0.0, "special": False}

    def collect(self, d: TokenDelta) -> None:
        """Non-streamed: remember the tokens for `details`."""
        if self.details and d.count:
            self.tokens.append(self._token(d))

    def delta(self, d: TokenDelta) -> bytes | None:
        if not d.count and not d.text:
            return None
        token = self._token(d)
        if d.last:
            self._held = token
            return None
        self.index += 1
        return ("data:" + _dumps({"index": self.index, "token": token, "generated_text": None, "details": None}) + "\n\n").encode()

    def end(self, finish: Finish, text: str, prompt_tokens: int, completion_tokens: int, tail: str = "") -> bytes:
        """`tail`: text the output guard held until the end; it goes into the final token (a special final
        token then becomes a plain one carrying that text)."""
        token = self._held or {"id": 0, "text": "", "logprob": 0.0, "special": True}
        if tail:
            token = {**token, "text": tail, "special": False} if token["special"] else {**token, "text": token["text"] + tail}
        self.index += 1
        details = None
        if self.details:
            details = {"finish_reason": _tgi_finish(finish), "generated_tokens": completion_tokens,
                       "seed": finish.seed, "input_length": prompt_tokens}
        return ("data:" + _dumps({"index": self.index, "token": token, "generated_text": self.prefix + text, "details": details}) + "\n\n").encode()

    @staticmethod
    def error_event(message: str, error_type: str) -> bytes:
        return ("data:" + _dumps({"error": message, "error_type": error_type}) + "\n\n").encode()

    def body(self, text: str, finish: Finish, prompt_tokens: int, completion_tokens: int) -> bytes:
        out: dict = {"generated_text": self.prefix + text}
        if self.details:
            out["details"] = {"finish_reason": _tgi_finish(finish), "generated_tokens": completion_tokens,
                              "seed": finish.seed, "prefill": [], "tokens": self.tokens}
        return _dumps(out).encode()
