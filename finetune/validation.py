"""Fine-tuning dataset validation: every problem of a JSONL file, each with line, JSON path, code and a fix.

A stream (or bytes) in, `ValidationResult` out. Tenants fix a whole file at once instead of one vague error per upload,
so nothing here stops at the first problem (only at `max_problems`, saying how many more there were).
`JsonlValidator` takes one line at a time and keeps counts, the capped problem list and 12 bytes per example for
the duplicate check, not the examples (unless asked to, for the trainer): memory is bounded by the longest line
(`MAX_LINE_BYTES`), whatever the file's length. A line nesting lists and objects deeper than `MAX_JSON_DEPTH` is a
problem of that line, found before `json.loads` (which would raise RecursionError on it).
Pure library code: no Django, callable from views, Celery tasks and the trainer.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from array import array
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import Any, BinaryIO, Callable

from common.parsers import MAX_JSON_DEPTH, json_depth_exceeds
from finetune.templating import to_messages, tokenize_chat_example

ROLES = ("system", "user", "assistant", "tool")
CHAT_KEYS = {"messages", "tools", "parallel_tool_calls"}
PROMPT_COMPLETION_KEYS = {"prompt", "completion"}
# OpenAI's preference (DPO) format: {"input": {"messages", "tools"?, "parallel_tool_calls"?}, "preferred_output":
# [one assistant message], "non_preferred_output": [one assistant message]}.
PREFERENCE_KEYS = {"input", "preferred_output", "non_preferred_output"}
PREFERENCE_OUTPUTS = ("preferred_output", "non_preferred_output")
MESSAGE_KEYS = {"role", "content", "weight", "name", "tool_calls", "tool_call_id"}
# OpenAI's tool-calling shapes: a declared tool and a call an assistant message makes.
TOOL_KEYS = {"type", "function"}
TOOL_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
TOOL_CALL_KEYS = {"id", "type", "function"}
TOOL_CALL_FUNCTION_KEYS = {"name", "arguments"}
FUNCTION_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # 512 MiB upload cap
DEFAULT_MIN_EXAMPLES = 10
DEFAULT_MAX_PROBLEMS = 1000
# Lists and objects nested deeper than MAX_JSON_DEPTH (common.parsers, 64) in one line, or in a tool call's
# arguments, are refused: no chat example needs more, and json.loads raises RecursionError on a few thousand levels.
# A longer line is a problem, not parsed (memory stays bounded): 1 MiB is far more text than the longest context the
# trainer uses (finetune.base_models.MAX_SEQ_LEN_CAP tokens).
MAX_LINE_BYTES = 1024 * 1024
# Duplicate groups listed in a report (each with at most this many lines); `duplicate_groups` counts them all.
MAX_DUPLICATE_GROUPS = 100
_DUPLICATE_BUCKETS = 256  # the duplicate check's 64-bit hashes are kept in this many arrays, grouped one at a time


@dataclass(frozen=True)
class Problem:
    """One fixable fault. line is 1-based (None for the whole file); path is a JSON path inside the line."""

    line: int | None
    path: str
    code: str
    message: str


@dataclass(frozen=True)
class Example:
    """A structurally valid example, normalised to chat messages (prompt/completion → user + assistant),
    with the functions it declares (OpenAI's `tools`) when it has any."""

    line: int
    messages: list[dict[str, Any]]
    total_tokens: int | None = None
    trainable_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    # Preference examples only: `messages` is the input conversation and these the two answers to it (each one
    # assistant message); token counts are then those of both conversations together.
    preferred_output: list[dict[str, Any]] | None = None
    non_preferred_output: list[dict[str, Any]] | None = None


@dataclass
class ValidationResult:
    """Outcome of a validation; `ok` means no problems. Token figures are None without a tokenizer.

    `examples` holds the examples only when they were asked for (`keep_examples`); `example_count` always counts them
    (with a tokenizer: those its chat template renders). `lines` and `bytes` are what was read.
    """

    problems: list[Problem] = field(default_factory=list)
    problems_omitted: int = 0
    format: str | None = None  # "chat" | "prompt_completion" | "preference"
    examples: list[Example] = field(default_factory=list)
    example_count: int = 0
    duplicates: list[list[int]] = field(default_factory=list)  # groups of line numbers with identical examples
    duplicate_groups: int = 0
    total_tokens: int | None = None
    trainable_tokens: int | None = None
    min_tokens: int | None = None
    mean_tokens: float | None = None
    max_tokens: int | None = None
    lines: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.problems_omitted

    def stats(self) -> dict[str, Any]:
        """The JSON-friendly summary shown to tenants and stored with a file."""
        return {
            "examples": self.example_count, "format": self.format,
            "total_tokens": self.total_tokens, "trainable_tokens": self.trainable_tokens,
            "min_tokens": self.min_tokens, "mean_tokens": self.mean_tokens, "max_tokens": self.max_tokens,
            "duplicates": self.duplicates, "duplicate_groups": self.duplicate_groups,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": [asdict(p) for p in self.problems],
                "problems_omitted": self.problems_omitted, "stats": self.stats()}


class _Collector:
    """Keeps the first `cap` problems and counts the rest."""

    def __init__(self, cap: int):
        self.cap, self.problems, self.omitted = cap, [], 0

    def add(self, line: int | None, path: str, code: str, message: str) -> None:
        if len(self.problems) < self.cap:
            self.problems.append(Problem(line, path, code, message))
        else:
            self.omitted += 1


# ---------------------------------------------------------------------------------------------- structure

def _check_message(c: _Collector, line: int, i: int, m: Any) -> bool:
    """Per-message checks; returns whether the message is structurally usable."""
    path = f"messages[{i}]"
    if not isinstance(m, dict):
        c.add(line, path, "message_not_object", f"{path} must be an object with role and content, got {_kind(m)}")
        return False
    ok = True
    for key in sorted(set(m) - MESSAGE_KEYS):
        c.add(line, f"{path}.{key}", "unknown_message_key",
              f"{path} has unknown key {key!r}; allowed: role, content, weight (assistant only), name, "
              "tool_calls (assistant only), tool_call_id (tool only)")
        ok = False
    role = m.get("role")
    if "role" not in m:
        c.add(line, f"{path}.role", "missing_role", f"{path} needs a role: one of {', '.join(ROLES)}")
        ok = False
    elif role not in ROLES:
        c.add(line, f"{path}.role", "invalid_role", f"role {role!r} is not one of {', '.join(ROLES)}")
        ok = False
    elif role == "system" and i != 0:
        c.add(line, f"{path}.role", "system_not_first", "a system message is only allowed as the first message")
        ok = False
    ok = _check_content(c, line, path, m) and ok
    if "weight" in m:
        w = m["weight"]
        if isinstance(w, bool) or w not in (0, 1):
            c.add(line, f"{path}.weight", "invalid_weight", f"weight must be 0 or 1, got {json.dumps(w)}")
            ok = False
        elif role != "assistant":
            c.add(line, f"{path}.weight", "weight_not_on_assistant",
                  "weight is only allowed on assistant messages; remove it here")
            ok = False
    if "tool_calls" in m:
        ok = _check_tool_calls(c, line, path, role, m["tool_calls"]) and ok
    if role == "tool" or "tool_call_id" in m:
        ok = _check_tool_call_id(c, line, path, role, m) and ok
    return ok


def _check_content(c: _Collector, line: int, path: str, m: dict[str, Any]) -> bool:
    """A non-empty string; an assistant message that makes tool calls may leave it out, null or empty."""
    calls = m.get("role") == "assistant" and "tool_calls" in m
    content = m.get("content")
    if calls and (content is None or isinstance(content, str)):
        return True
    if "content" not in m:
        also = " (or tool_calls)" if m.get("role") == "assistant" else ""
        c.add(line, f"{path}.content", "missing_content", f"{path} needs a content string{also}")
    elif not isinstance(content, str):
        also = "; null content is only allowed beside tool_calls" if content is None and m.get("role") == "assistant" else ""
        c.add(line, f"{path}.content", "content_not_string", f"content must be a string, got {_kind(content)}{also}")
    elif not content.strip():
        c.add(line, f"{path}.content", "empty_content", "content is empty; write the message text or drop the message")
    else:
        return True
    return False


# ---------------------------------------------------------------------------------------------- tool calling

def _check_function_name(c: _Collector, line: int, path: str, name: Any) -> bool:
    if isinstance(name, str) and FUNCTION_NAME_RE.match(name):
        return True
    c.add(line, path, "invalid_function_name",
          f"a function name is 1 to 64 letters, digits, '_' or '-', got {json.dumps(name)}")
    return False


def _unknown_keys(c: _Collector, line: int, path: str, obj: dict[str, Any], allowed: set[str], code: str) -> bool:
    for key in sorted(set(obj) - allowed):
        c.add(line, f"{path}.{key}", code, f"{path} has unknown key {key!r}; allowed: {', '.join(sorted(allowed))}")
    return set(obj) <= allowed


def _check_function_wrapper(c: _Collector, line: int, path: str, obj: dict[str, Any], kind: str, keys: set[str],
                            function_keys: set[str], needs: str) -> tuple[bool, dict[str, Any] | None]:
    """`{"type": "function", "function": {...}}`, the shape a declared tool (kind "tool") and a call (kind
    "tool_call") share: (ok, the function object, or None when it is not an object)."""
    ok = _unknown_keys(c, line, path, obj, keys, f"unknown_{kind}_key")
    if obj.get("type") != "function":
        c.add(line, f"{path}.type", f"invalid_{kind}_type", f'type must be "function", got {json.dumps(obj.get("type"))}')
        ok = False
    function = obj.get("function")
    if not isinstance(function, dict):
        c.add(line, f"{path}.function", f"invalid_{kind}_function",
              f"function must be an object with {needs}, got {_kind(function)}")
        return False, None
    ok = _unknown_keys(c, line, f"{path}.function", function, function_keys, f"unknown_{kind}_key") and ok
    return ok, function


def _check_tools(c: _Collector, line: int, tools: Any) -> tuple[bool, set[str]]:
    """The top-level `tools` list: (ok, names of the functions it declares)."""
    if not isinstance(tools, list):
        c.add(line, "tools", "tools_not_list", f"tools must be a list of function definitions, got {_kind(tools)}")
        return False, set()
    if not tools:
        c.add(line, "tools", "tools_empty", "tools is empty; declare the functions the assistant may call, or drop the key")
        return False, set()
    ok, names = True, set()
    for k, tool in enumerate(tools):
        path = f"tools[{k}]"
        if not isinstance(tool, dict):
            c.add(line, path, "tool_not_object",
                  f'{path} must be an object like {{"type": "function", "function": {{"name": ...}}}}, got {_kind(tool)}')
            ok = False
            continue
        wrapper_ok, function = _check_function_wrapper(
            c, line, path, tool, "tool", TOOL_KEYS, TOOL_FUNCTION_KEYS, "a name (and optionally description and parameters)")
        ok = wrapper_ok and ok
        if function is None:
            continue
        name = function.get("name")
        if not _check_function_name(c, line, f"{path}.function.name", name):
            ok = False
        elif name in names:
            c.add(line, f"{path}.function.name", "duplicate_tool_name", f"function {name!r} is declared twice in tools")
            ok = False
        else:
            names.add(name)
        for key, kind, wanted in (("description", str, "a string"), ("parameters", dict, "a JSON Schema object"),
                                  ("strict", bool, "true or false")):
            if key in function and not isinstance(function[key], kind):
                c.add(line, f"{path}.function.{key}", f"invalid_tool_{key}",
                      f"{key} must be {wanted}, got {_kind(function[key])}")
                ok = False
    return ok, names


def _check_tool_calls(c: _Collector, line: int, path: str, role: Any, calls: Any) -> bool:
    """An assistant message's `tool_calls`: [{"id", "type": "function", "function": {"name", "arguments"}}]."""
    path = f"{path}.tool_calls"
    if role != "assistant":
        c.add(line, path, "tool_calls_not_on_assistant", "only assistant messages make tool calls; remove tool_calls here")
        return False
    if not isinstance(calls, list):
        c.add(line, path, "tool_calls_not_list", f"tool_calls must be a list of calls, got {_kind(calls)}")
        return False
    if not calls:
        c.add(line, path, "tool_calls_empty", "tool_calls is empty; list at least one call, or drop the key and write content")
        return False
    return all([_check_tool_call(c, line, f"{path}[{j}]", call) for j, call in enumerate(calls)])


def _check_tool_call(c: _Collector, line: int, path: str, call: Any) -> bool:
    if not isinstance(call, dict):
        c.add(line, path, "tool_call_not_object",
              f'{path} must be an object like {{"id": ..., "type": "function", "function": {{"name": ..., "arguments": "{{}}"}}}}, '
              f"got {_kind(call)}")
        return False
    id_ok = isinstance(call.get("id"), str) and bool(call["id"].strip())
    if not id_ok:
        c.add(line, f"{path}.id", "invalid_tool_call_id",
              f"a tool call needs an id string (its tool message repeats it as tool_call_id), got {_kind(call.get('id'))}")
    ok, function = _check_function_wrapper(c, line, path, call, "tool_call", TOOL_CALL_KEYS, TOOL_CALL_FUNCTION_KEYS,
                                           "name and arguments")
    if function is None:
        return False
    ok = ok and id_ok
    ok = _check_function_name(c, line, f"{path}.function.name", function.get("name")) and ok
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        c.add(line, f"{path}.function.arguments", "arguments_not_string",
              f'arguments must be a string of JSON such as "{{\\"city\\": \\"Paris\\"}}", got '
              f'{_kind(arguments) if "arguments" in function else "nothing"}')
        return False
    if too_deep(arguments.encode("utf-8", "surrogatepass")):
        c.add(line, f"{path}.function.arguments", "arguments_too_deep",
              f"arguments nests lists and objects more than {MAX_JSON_DEPTH} levels deep; flatten them")
        return False
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError as e:
        c.add(line, f"{path}.function.arguments", "arguments_invalid_json",
              f"arguments is not valid JSON at column {e.colno}: {e.msg}")
        return False
    if not isinstance(parsed, dict):
        c.add(line, f"{path}.function.arguments", "arguments_not_object",
              f"arguments must be a JSON object of the function's parameters, got {_kind(parsed)}")
        return False
    return ok


def _check_tool_call_id(c: _Collector, line: int, path: str, role: Any, m: dict[str, Any]) -> bool:
    """A tool message names the call it answers; no other message has a tool_call_id."""
    if role != "tool":
        c.add(line, f"{path}.tool_call_id", "tool_call_id_not_on_tool",
              "tool_call_id is only allowed on tool messages; remove it here")
        return False
    if "tool_call_id" not in m:
        c.add(line, f"{path}.tool_call_id", "missing_tool_call_id",
              "a tool message needs the tool_call_id of the assistant's call it answers")
        return False
    if not isinstance(m["tool_call_id"], str) or not m["tool_call_id"].strip():
        c.add(line, f"{path}.tool_call_id", "invalid_tool_call_id",
              f"tool_call_id must be the id string of an earlier tool call, got {_kind(m['tool_call_id'])}")
        return False
    return True


def _check_tool_flow(c: _Collector, line: int, messages: list[Any], declared: set[str] | None, parallel: bool) -> bool:
    """Across messages: call ids unique, every tool message answers an earlier call once, a call's results come
    before the conversation moves on, calls name declared functions (when `tools` is given), one call a turn
    when parallel_tool_calls is false. Malformed pieces were reported per message and are skipped here."""
    ok = True
    made: dict[str, int] = {}  # call id -> index of the assistant message that made it
    answered: set[str] = set()
    waiting: tuple[int, list[str]] | None = None  # the latest calls, awaiting their tool messages
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            continue
        role = m.get("role")
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id.strip():
                continue
            if call_id not in made:
                c.add(line, f"messages[{i}].tool_call_id", "unknown_tool_call_id",
                      f"no earlier assistant message made a tool call with id {call_id!r}")
                ok = False
            elif call_id in answered:
                c.add(line, f"messages[{i}].tool_call_id", "duplicate_tool_result",
                      f"call {call_id!r} was already answered by an earlier tool message")
                ok = False
            answered.add(call_id)
            continue
        if waiting is not None and (unanswered := [x for x in waiting[1] if x not in answered]):
            c.add(line, f"messages[{waiting[0]}].tool_calls", "missing_tool_result",
                  f"no tool message answers {', '.join(map(repr, unanswered))} before messages[{i}]; "
                  "add a tool message with each call's result")
            ok = False
        waiting = None
        calls = m.get("tool_calls")
        if role != "assistant" or not isinstance(calls, list):
            continue
        if not parallel and len(calls) > 1:
            c.add(line, f"messages[{i}].tool_calls", "parallel_tool_calls_disabled",
                  f"parallel_tool_calls is false but this message makes {len(calls)} calls; make one call a turn")
            ok = False
        waiting = (i, [])
        for j, call in enumerate(calls):
            if not isinstance(call, dict):
                continue
            path = f"messages[{i}].tool_calls[{j}]"
            call_id = call.get("id")
            if isinstance(call_id, str) and call_id.strip():
                if call_id in made:
                    c.add(line, f"{path}.id", "duplicate_tool_call_id",
                          f"id {call_id!r} is already used by a call in messages[{made[call_id]}]; give each call its own id")
                    ok = False
                else:
                    made[call_id] = i
                    waiting[1].append(call_id)
            function = call.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            if declared is not None and isinstance(name, str) and FUNCTION_NAME_RE.match(name) and name not in declared:
                c.add(line, f"{path}.function.name", "undeclared_function",
                      f"{name!r} is not declared in tools (declared: {', '.join(sorted(declared))}); "
                      "declare it or call one of those")
                ok = False
    return ok


def _check_chat(c: _Collector, line: int, record: dict[str, Any]) -> bool:
    ok, declared = True, None
    if "tools" in record:
        ok, names = _check_tools(c, line, record["tools"])
        declared = names if ok else None  # a broken tools list would make every call look undeclared
    parallel = record.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        c.add(line, "parallel_tool_calls", "invalid_parallel_tool_calls",
              f"parallel_tool_calls must be true or false, got {json.dumps(parallel)}")
        ok, parallel = False, True
    messages = record["messages"]
    if not isinstance(messages, list):
        c.add(line, "messages", "messages_not_list", f"messages must be a list of messages, got {_kind(messages)}")
        return False
    if not messages:
        c.add(line, "messages", "messages_empty", "messages is empty; an example needs at least a user and an assistant message")
        return False
    ok = all([_check_message(c, line, i, m) for i, m in enumerate(messages)]) and ok
    ok = _check_tool_flow(c, line, messages, declared, parallel) and ok
    dicts = [m for m in messages if isinstance(m, dict)]
    assistants = [m for m in dicts if m.get("role") == "assistant"]
    if not assistants:
        c.add(line, "messages", "no_assistant_message", "an example needs at least one assistant message to learn from")
        return False
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") != "assistant":
        c.add(line, f"messages[{len(messages) - 1}].role", "last_not_assistant",
              "the last message must be the assistant's (the answer the model should learn)")
        ok = False
    if all(m.get("weight", 1) == 0 for m in assistants):
        c.add(line, "messages", "no_trainable_message",
              "every assistant message has weight 0, so nothing would be learned; set weight 1 on at least one")
        ok = False
    return ok


def _check_prompt_completion(c: _Collector, line: int, record: dict[str, Any]) -> bool:
    ok = True
    for key in ("prompt", "completion"):
        if key not in record:
            c.add(line, key, f"missing_{key}", f"a prompt/completion example needs a {key} string")
            ok = False
        elif not isinstance(record[key], str) or not record[key].strip():
            c.add(line, key, f"invalid_{key}", f"{key} must be a non-empty string")
            ok = False
    return ok


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


# ---------------------------------------------------------------------------------------------- preference (DPO)

_MESSAGE_INDEX_RE = re.compile(r"\bmessages\[(\d+)\]")


class _PreferencePaths:
    """The chat checks' collector for one conversation built from a preference example (its input's messages, then one
    output), reporting each problem under the example's own paths: `messages[i]` becomes `input.messages[i]` or
    `preferred_output[0]`, `tools` becomes `input.tools`. With `outputs_only` the input's problems are dropped (the
    first conversation reported them); `output=None` checks the input alone, under a stand-in answer."""

    def __init__(self, c: _Collector, n_input: int, output: str | None, outputs_only: bool = False):
        self.c, self.n_input, self.output, self.outputs_only = c, n_input, output, outputs_only

    def _map(self, text: str) -> str:
        def sub(m: re.Match) -> str:
            i = int(m.group(1))
            return f"input.messages[{i}]" if i < self.n_input else f"{self.output}[{i - self.n_input}]"
        return _MESSAGE_INDEX_RE.sub(sub, text)

    def add(self, line: int | None, path: str, code: str, message: str) -> None:
        mapped = self._map(path)
        if not mapped.startswith(("input.", f"{self.output}[")):  # "messages", "tools[…]", "parallel_tool_calls"
            mapped = f"input.{mapped}"
        from_output = not mapped.startswith("input.")
        if (self.outputs_only and not from_output) or (self.output is None and from_output):
            return
        self.c.add(line, mapped, code, self._map(message))


def _check_output(c: _Collector, line: int, record: dict[str, Any], key: str) -> bool:
    """`preferred_output` / `non_preferred_output`: a list of exactly one assistant message (OpenAI trains
    one-turn answers), without `weight` (the preferred answer is the one trained towards)."""
    out = record.get(key)
    if key not in record:
        c.add(line, key, f"missing_{key}", f'a preference example needs {key}: [{{"role": "assistant", "content": ...}}]')
    elif not isinstance(out, list) or len(out) != 1:
        got = f"a list of {len(out)} messages" if isinstance(out, list) else _kind(out)
        c.add(line, key, f"invalid_{key}", f"{key} must be a list of exactly one assistant message, got {got}")
    elif not isinstance(out[0], dict):
        c.add(line, f"{key}[0]", "message_not_object", f"{key}[0] must be an object with role and content, got {_kind(out[0])}")
    elif out[0].get("role") != "assistant":
        c.add(line, f"{key}[0].role", "output_not_assistant",
              f'{key}[0] is the answer to the input: its role must be "assistant", got {json.dumps(out[0].get("role"))}')
    elif "weight" in out[0]:
        c.add(line, f"{key}[0].weight", "unknown_message_key",
              "weight is not used in preference data (the preferred output is trained towards, the other away from); "
              "remove it")
    else:
        return True
    return False


def _check_preference(c: _Collector, line: int, record: dict[str, Any]) -> bool:
    """OpenAI's preference format: the input conversation (chat rules, ending with the user's turn or a tool result)
    and two one-message answers; each answer is checked as the end of the input's conversation (tool calls against
    the input's tools, …)."""
    ok = True
    inp, messages = record.get("input"), None
    if "input" not in record:
        c.add(line, "input", "missing_input",
              'a preference example needs "input": {"messages": [...]}, the conversation both outputs answer')
    elif not isinstance(inp, dict):
        c.add(line, "input", "input_not_object", f"input must be an object with messages (and optionally tools), got {_kind(inp)}")
    else:
        ok = _unknown_keys(c, line, "input", inp, CHAT_KEYS, "unknown_input_key")
        messages = inp.get("messages")
        if "messages" not in inp:
            c.add(line, "input.messages", "missing_messages",
                  "input needs messages: the conversation up to the answer, ending with the user's message")
        elif not isinstance(messages, list):
            c.add(line, "input.messages", "messages_not_list", f"messages must be a list of messages, got {_kind(messages)}")
        elif not messages:
            c.add(line, "input.messages", "messages_empty", "messages is empty; the input needs at least the user's message")
        else:
            last = messages[-1]
            if isinstance(last, dict) and last.get("role") in ("assistant", "system"):
                c.add(line, f"input.messages[{len(messages) - 1}].role", "input_last_not_user",
                      "the input must end with the user's message (or a tool result) that both outputs answer; "
                      "put the assistant's answers in preferred_output and non_preferred_output")
                ok = False
    outputs = {key: record[key] for key in PREFERENCE_OUTPUTS if _check_output(c, line, record, key)}
    ok = ok and len(outputs) == 2 and isinstance(messages, list) and bool(messages)
    if not isinstance(messages, list) or not messages:
        return False
    extra = {k: inp[k] for k in ("tools", "parallel_tool_calls") if k in inp}
    answers = list(outputs.items()) or [(None, [{"role": "assistant", "content": "-"}])]
    for k, (key, out) in enumerate(answers):
        view = _PreferencePaths(c, len(messages), key, outputs_only=k > 0)
        ok = _check_chat(view, line, {"messages": messages + out, **extra}) and ok
    if len(outputs) == 2 and outputs["preferred_output"] == outputs["non_preferred_output"]:
        c.add(line, "non_preferred_output", "identical_outputs",
              "preferred_output and non_preferred_output are the same answer, so there is no preference to learn")
        ok = False
    return ok


def preference_pair(example: Example) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(chosen, rejected) conversations of a preference example: the input, then each output. Assistant messages of
    the input get weight 0, so only the output's tokens are marked (tokenize_chat_example's mask)."""
    context = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in example.messages]
    return context + example.preferred_output, context + example.non_preferred_output


# ---------------------------------------------------------------------------------------------- nesting

# The platform's one depth scan (common.parsers, as every JSON entry point): linear and recursion-free, so it is
# safe on lines `json.loads` would raise RecursionError on.
too_deep = json_depth_exceeds


# ---------------------------------------------------------------------------------------------- the file

class JsonlValidator:
    """Checks a fine-tuning JSONL file fed one line at a time; with a chat-template tokenizer also counts tokens and
    checks lengths, example by example.

    Keeps counts, the first `max_problems` problems, token statistics and a 64-bit hash and line number per example
    (the duplicate check), and the examples themselves only with `keep_examples` (the trainer needs them): memory is
    bounded by the longest line, not the file. Blank lines and CRLF endings are accepted; a UTF-8 byte-order mark at
    the start is ignored.
    """

    def __init__(self, *, filename: str | None = None, tokenizer=None, context_length: int | None = None,
                 min_examples: int = DEFAULT_MIN_EXAMPLES, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_problems: int = DEFAULT_MAX_PROBLEMS, keep_examples: bool = False):
        self.tokenizer, self.context_length = tokenizer, context_length
        self.min_examples, self.max_bytes, self.keep_examples = min_examples, max_bytes, keep_examples
        self.c = _Collector(max_problems)
        self.result = ValidationResult()
        self.nonblank = 0
        self.too_large = False
        self._hashes = [array("Q") for _ in range(_DUPLICATE_BUCKETS)]
        self._hash_lines = [array("I") for _ in range(_DUPLICATE_BUCKETS)]
        self._tokens = [0, 0]  # total, trainable
        if filename is not None and not filename.lower().endswith(".jsonl"):
            self.c.add(None, "", "wrong_extension", f"{filename!r} must be a .jsonl file (one JSON object per line)")

    def refuse_size(self, size: int) -> None:
        """The file is `size` bytes, over `max_bytes`: it is not read (further)."""
        self.too_large = True
        self.c.add(None, "", "file_too_large", f"the file is {size:,} bytes; the limit is {self.max_bytes:,} bytes")

    def feed(self, raw: bytes) -> None:
        """One line of the file, its newline included or not."""
        r = self.result
        r.lines += 1
        r.bytes += len(raw)
        n = r.lines
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        raw = raw.rstrip(b"\n").rstrip(b"\r")
        if not raw.strip():
            return
        self.nonblank += 1
        record = self._parse(n, raw)
        if record is not None:
            self._check(n, record)

    def feed_too_long(self, size: int) -> None:
        """A line of `size` bytes, longer than MAX_LINE_BYTES: reported, not parsed."""
        self.result.lines += 1
        self.result.bytes += size
        self.nonblank += 1
        self.c.add(self.result.lines, "", "line_too_long",
                   f"this line is {size:,} bytes; an example may be at most {MAX_LINE_BYTES:,} bytes, far longer than "
                   "any context a model is trained on: shorten or split it")

    def _parse(self, n: int, raw: bytes) -> dict[str, Any] | None:
        c = self.c
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            c.add(n, "", "invalid_utf8", f"byte {e.start + 1} of this line is not valid UTF-8; save the file as UTF-8")
            return None
        if too_deep(raw):
            c.add(n, "", "nesting_too_deep", f"this line nests lists and objects more than {MAX_JSON_DEPTH} levels "
                  "deep; an example is an object of messages whose content is a string: flatten it")
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            c.add(n, "", "invalid_json", f"not valid JSON at column {e.colno}: {e.msg}")
            return None
        except RecursionError:  # too_deep() stops such lines first; this keeps any other from crashing a worker
            c.add(n, "", "nesting_too_deep", "this line nests lists and objects too deeply to be read; flatten it")
            return None
        if not isinstance(record, dict):
            c.add(n, "", "not_an_object", f"each line must be a JSON object, got {_kind(record)}")
            return None
        return record

    def _check(self, n: int, record: dict[str, Any]) -> None:
        c, r = self.c, self.result
        fmt = "chat" if "messages" in record else ("preference" if PREFERENCE_KEYS & set(record) else (
            "prompt_completion" if PROMPT_COMPLETION_KEYS & set(record) else None))
        if fmt is None:
            c.add(n, "", "unknown_format",
                  'an example needs "messages" (chat), "prompt" and "completion", or "input", "preferred_output" and '
                  '"non_preferred_output" (preference); found keys: ' + (", ".join(sorted(record)) or "none"))
            return
        if r.format is None:
            r.format = fmt
        elif fmt != r.format:
            c.add(n, "", "mixed_format", f"this line is {fmt} but the file started as {r.format}; use one format per file")
            return
        allowed = {"chat": CHAT_KEYS, "preference": PREFERENCE_KEYS}.get(fmt, PROMPT_COMPLETION_KEYS)
        unknown = sorted(set(record) - allowed)
        for key in unknown:
            c.add(n, key, "unknown_key", f"unknown top-level key {key!r}; allowed: {', '.join(sorted(allowed))}")
        check = {"chat": _check_chat, "preference": _check_preference}.get(fmt, _check_prompt_completion)
        ok = check(c, n, record)
        if not ok or unknown:
            return
        digest = hashlib.blake2b(json.dumps(record, sort_keys=True).encode(), digest_size=8).digest()
        key = int.from_bytes(digest, "little")
        self._hashes[key % _DUPLICATE_BUCKETS].append(key)
        self._hash_lines[key % _DUPLICATE_BUCKETS].append(n)
        if fmt == "preference":
            example = Example(n, record["input"]["messages"], tools=record["input"].get("tools"),
                              preferred_output=record["preferred_output"],
                              non_preferred_output=record["non_preferred_output"])
        else:
            example = Example(n, to_messages(record), tools=record.get("tools"))
        if self.tokenizer is not None:
            example = self._count(example)
            if example is None:
                return
        r.example_count += 1
        if self.keep_examples:
            r.examples.append(example)

    def _count(self, ex: Example) -> Example | None:
        """Tokenize one example with the chat template; None when the template cannot render it (a problem)."""
        c, context_length = self.c, self.context_length
        conversations = preference_pair(ex) if ex.preferred_output is not None else (ex.messages,)
        where = ("preferred_output", "non_preferred_output") if ex.preferred_output is not None else ("",)
        try:
            encoded = [tokenize_chat_example(self.tokenizer, messages, ex.tools) for messages in conversations]
        except Exception as e:  # the model's own template rejects it (e.g. a role it does not support)
            path = "input.messages" if ex.preferred_output is not None else "messages"
            c.add(ex.line, path, "template_error", f"the base model's chat template cannot render this example: {e}")
            return None
        if len(encoded) > 1:  # a preference pair: both conversations, each within the context
            for (ids, mask), key in zip(encoded, where):
                self._check_length(ex.line, key, len(ids), mask, f" (the input with {key})")
            size, trainable = sum(len(ids) for ids, _ in encoded), sum(sum(mask) for _, mask in encoded)
        else:
            ids, mask = encoded[0]
            size, trainable = len(ids), sum(mask)
            self._check_length(ex.line, "messages", size, mask, "")
        r = self.result
        r.min_tokens = size if r.min_tokens is None else min(r.min_tokens, size)
        r.max_tokens = size if r.max_tokens is None else max(r.max_tokens, size)
        self._tokens[0] += size
        self._tokens[1] += trainable
        return replace(ex, total_tokens=size, trainable_tokens=trainable)

    def _check_length(self, line: int, path: str, size: int, mask: list[bool], what: str) -> None:
        c, context_length = self.c, self.context_length
        if context_length is not None and size > context_length:
            c.add(line, path, "too_long",
                  f"the example{what} is {size} tokens, longer than the context of {context_length} tokens; shorten it")
            if not any(mask[:context_length]):
                c.add(line, path, "assistant_truncated",
                      f"no assistant token falls within the first {context_length} tokens, so nothing would be learned")

    def finish(self) -> ValidationResult:
        """The result, once every line has been fed."""
        c, r = self.c, self.result
        if not self.too_large:
            if not self.nonblank:
                c.add(None, "", "empty_file", "the file has no examples; put one JSON object per line")
            elif self.nonblank < self.min_examples:
                c.add(None, "", "too_few_examples",
                      f"the file has {self.nonblank} examples; at least {self.min_examples} are required")
        groups = []
        for hashes, lines in zip(self._hashes, self._hash_lines):  # one bucket's dict at a time
            seen: dict[int, list[int]] = defaultdict(list)
            for key, n in zip(hashes, lines):
                seen[key].append(n)
            groups += [group for group in seen.values() if len(group) > 1]
        groups.sort()
        r.duplicate_groups = len(groups)
        r.duplicates = [group[:MAX_DUPLICATE_GROUPS] for group in groups[:MAX_DUPLICATE_GROUPS]]
        if self.tokenizer is not None and not self.too_large:
            r.total_tokens, r.trainable_tokens = self._tokens
            if r.example_count:
                r.mean_tokens = r.total_tokens / r.example_count
        r.problems, r.problems_omitted = c.problems, c.omitted
        return r


def validate_stream(stream: BinaryIO, *, size: int | None = None,
                    on_progress: Callable[[int, int], None] | None = None, **options) -> ValidationResult:
    """Validate a JSONL file read from a binary stream, line by line; `options` are `JsonlValidator`'s.

    `size` (bytes, when known) refuses an oversized file before reading it; otherwise reading stops once `max_bytes`
    is passed. `on_progress(lines, bytes)` is called after each line.
    """
    validator = JsonlValidator(**options)
    if size is not None and size > validator.max_bytes:
        validator.refuse_size(size)
        return validator.finish()
    while raw := stream.readline(MAX_LINE_BYTES + 1):
        if len(raw) > MAX_LINE_BYTES:  # too long: skip to its end without holding it
            length = len(raw)
            while not raw.endswith(b"\n") and (raw := stream.readline(MAX_LINE_BYTES)):
                length += len(raw)
            validator.feed_too_long(length)
        else:
            validator.feed(raw)
        if validator.result.bytes > validator.max_bytes:
            validator.refuse_size(validator.result.bytes)
            break
        if on_progress is not None:
            on_progress(validator.result.lines, validator.result.bytes)
    return validator.finish()


def validate_jsonl(
    data: bytes,
    *,
    filename: str | None = None,
    tokenizer=None,
    context_length: int | None = None,
    min_examples: int = DEFAULT_MIN_EXAMPLES,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
) -> ValidationResult:
    """Check a fine-tuning JSONL file held in memory, keeping its examples (`validate_stream` for a stored file)."""
    return validate_stream(io.BytesIO(data), size=len(data), filename=filename, tokenizer=tokenizer,
                           context_length=context_length, min_examples=min_examples, max_bytes=max_bytes,
                           max_problems=max_problems, keep_examples=True)


def find_overlap(train: ValidationResult, valid: ValidationResult) -> list[tuple[int, int]]:
    """(training line, validation line) pairs of identical conversations (same tools, and for preference data the same
    outputs, too): leaked validation examples.
    Both results must hold their examples (`validate_jsonl`, or `keep_examples`)."""
    def key(ex: Example) -> str:
        return json.dumps([ex.tools, ex.messages, ex.preferred_output, ex.non_preferred_output], sort_keys=True)

    seen: dict[str, list[int]] = defaultdict(list)
    for ex in train.examples:
        seen[key(ex)].append(ex.line)
    return [(t, ex.line) for ex in valid.examples for t in seen.get(key(ex), [])]
