"""Fine-tuning dataset validation: every problem of a JSONL file, each with line, JSON path, code and a fix.

Bytes in, `ValidationResult` out. Tenants fix a whole file at once instead of one vague error per upload,
so nothing here stops at the first problem (only at `max_problems`, saying how many more there were).
Pure library code: no Django, callable from views, Celery tasks and the trainer.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

ROLES = ("system", "user", "assistant", "tool")
CHAT_KEYS = {"messages"}
PROMPT_COMPLETION_KEYS = {"prompt", "completion"}
MESSAGE_KEYS = {"role", "content", "weight", "name"}
DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # 512 MiB upload cap
DEFAULT_MIN_EXAMPLES = 10
DEFAULT_MAX_PROBLEMS = 1000


@dataclass(frozen=True)
class Problem:
    """One fixable fault. line is 1-based (None for the whole file); path is a JSON path inside the line."""

    line: int | None
    path: str
    code: str
    message: str


@dataclass(frozen=True)
class Example:
    """A structurally valid example, normalised to chat messages (prompt/completion → user + assistant)."""

    line: int
    messages: list[dict[str, Any]]
    total_tokens: int | None = None
    trainable_tokens: int | None = None


@dataclass
class ValidationResult:
    """Outcome of `validate_jsonl`; `ok` means no problems. Token figures are None without a tokenizer."""

    problems: list[Problem] = field(default_factory=list)
    problems_omitted: int = 0
    format: str | None = None  # "chat" | "prompt_completion"
    examples: list[Example] = field(default_factory=list)
    duplicates: list[list[int]] = field(default_factory=list)  # groups of line numbers with identical examples
    total_tokens: int | None = None
    trainable_tokens: int | None = None
    min_tokens: int | None = None
    mean_tokens: float | None = None
    max_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and not self.problems_omitted

    def stats(self) -> dict[str, Any]:
        """The JSON-friendly summary shown to tenants and stored with a file."""
        return {
            "examples": len(self.examples), "format": self.format,
            "total_tokens": self.total_tokens, "trainable_tokens": self.trainable_tokens,
            "min_tokens": self.min_tokens, "mean_tokens": self.mean_tokens, "max_tokens": self.max_tokens,
            "duplicates": self.duplicates,
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


# ---------------------------------------------------------------------------------------------- tokens

def to_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Chat messages of a record in either accepted format (prompt/completion → one user/assistant turn)."""
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]


def _render(tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    if not messages and not add_generation_prompt:
        return ""
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_chat_example(tokenizer, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[bool]]:
    """Render with the chat template and mark trainable tokens; the one tokenization trainer and validator share.

    A token is trainable when it overlaps the text an assistant message (weight ≠ 0) adds after its
    generation prompt: its content and end-of-turn marker, so the model also learns to stop. The whole
    conversation is tokenized once (as at inference); spans come from re-rendering prefixes, which needs
    a template whose renderings of prefixes are prefixes of the whole (true for Llama/ChatML/Mistral styles).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast tokenizer (with offset mappings) is required to find assistant tokens")
    full = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or message.get("weight", 1) == 0:
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True))
        through = _render(tokenizer, messages[: i + 1])
        if not full.startswith(through) or not through.startswith(full[:start]):
            raise ValueError("the chat template does not render conversation prefixes as prefixes; "
                             "assistant tokens cannot be located")
        spans.append((start, len(through)))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [_overlaps(a, b, spans) for a, b in encoding["offset_mapping"]]
    return list(encoding["input_ids"]), mask


def _overlaps(a: int, b: int, spans: list[tuple[int, int]]) -> bool:
    """Character range [a, b) touches a trainable span; a zero-width token counts when inside one."""
    return any((a < hi and b > lo) if a < b else lo < a <= hi for lo, hi in spans)


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
              f"{path} has unknown key {key!r}; allowed: role, content, weight (assistant only), name")
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
    if "content" not in m:
        c.add(line, f"{path}.content", "missing_content", f"{path} needs a content string")
        ok = False
    elif not isinstance(m["content"], str):
        c.add(line, f"{path}.content", "content_not_string", f"content must be a string, got {_kind(m['content'])}")
        ok = False
    elif not m["content"].strip():
        c.add(line, f"{path}.content", "empty_content", "content is empty; write the message text or drop the message")
        ok = False
    if "weight" in m:
        w = m["weight"]
        if isinstance(w, bool) or w not in (0, 1):
            c.add(line, f"{path}.weight", "invalid_weight", f"weight must be 0 or 1, got {json.dumps(w)}")
            ok = False
        elif role != "assistant":
            c.add(line, f"{path}.weight", "weight_not_on_assistant",
                  "weight is only allowed on assistant messages; remove it here")
            ok = False
    return ok


def _check_chat(c: _Collector, line: int, record: dict[str, Any]) -> bool:
    messages = record["messages"]
    if not isinstance(messages, list):
        c.add(line, "messages", "messages_not_list", f"messages must be a list of messages, got {_kind(messages)}")
        return False
    if not messages:
        c.add(line, "messages", "messages_empty", "messages is empty; an example needs at least a user and an assistant message")
        return False
    ok = all([_check_message(c, line, i, m) for i, m in enumerate(messages)])
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


# ---------------------------------------------------------------------------------------------- the file

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
    """Check a fine-tuning JSONL file; with a chat-template tokenizer also count tokens and check lengths.

    Blank lines and CRLF endings are accepted; a UTF-8 byte-order mark at the start is ignored.
    """
    c = _Collector(max_problems)
    result = ValidationResult()
    if filename is not None and not filename.lower().endswith(".jsonl"):
        c.add(None, "", "wrong_extension", f"{filename!r} must be a .jsonl file (one JSON object per line)")
    if len(data) > max_bytes:
        c.add(None, "", "file_too_large", f"the file is {len(data):,} bytes; the limit is {max_bytes:,} bytes")
        return _finish(result, c)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = [(n, raw.rstrip(b"\r")) for n, raw in enumerate(data.split(b"\n"), start=1)]
    lines = [(n, raw) for n, raw in lines if raw.strip()]
    if not lines:
        c.add(None, "", "empty_file", "the file has no examples; put one JSON object per line")
        return _finish(result, c)

    by_content: dict[str, list[int]] = defaultdict(list)
    for n, raw in lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            c.add(n, "", "invalid_utf8", f"byte {e.start + 1} of this line is not valid UTF-8; save the file as UTF-8")
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            c.add(n, "", "invalid_json", f"not valid JSON at column {e.colno}: {e.msg}")
            continue
        if not isinstance(record, dict):
            c.add(n, "", "not_an_object", f"each line must be a JSON object, got {_kind(record)}")
            continue
        fmt = "chat" if "messages" in record else (
            "prompt_completion" if PROMPT_COMPLETION_KEYS & set(record) else None)
        if fmt is None:
            c.add(n, "", "unknown_format",
                  'an example needs "messages" (chat) or "prompt" and "completion"; found keys: '
                  + (", ".join(sorted(record)) or "none"))
            continue
        if result.format is None:
            result.format = fmt
        elif fmt != result.format:
            c.add(n, "", "mixed_format", f"this line is {fmt} but the file started as {result.format}; use one format per file")
            continue
        allowed = CHAT_KEYS if fmt == "chat" else PROMPT_COMPLETION_KEYS
        unknown = sorted(set(record) - allowed)
        for key in unknown:
            c.add(n, key, "unknown_key", f"unknown top-level key {key!r}; allowed: {', '.join(sorted(allowed))}")
        ok = (_check_chat if fmt == "chat" else _check_prompt_completion)(c, n, record)
        if ok and not unknown:
            result.examples.append(Example(n, to_messages(record)))
            by_content[json.dumps(record, sort_keys=True)].append(n)

    if len(lines) < min_examples:
        c.add(None, "", "too_few_examples", f"the file has {len(lines)} examples; at least {min_examples} are required")
    result.duplicates = [group for group in by_content.values() if len(group) > 1]
    if tokenizer is not None:
        _count_tokens(c, result, tokenizer, context_length)
    return _finish(result, c)


def _count_tokens(c: _Collector, result: ValidationResult, tokenizer, context_length: int | None) -> None:
    counted = []
    for ex in result.examples:
        try:
            ids, mask = tokenize_chat_example(tokenizer, ex.messages)
        except Exception as e:  # the model's own template rejects it (e.g. a role it does not support)
            c.add(ex.line, "messages", "template_error", f"the base model's chat template cannot render this example: {e}")
            continue
        counted.append(Example(ex.line, ex.messages, len(ids), sum(mask)))
        if context_length is not None and len(ids) > context_length:
            c.add(ex.line, "messages", "too_long",
                  f"the example is {len(ids)} tokens, longer than the context of {context_length} tokens; shorten it")
            if not any(mask[:context_length]):
                c.add(ex.line, "messages", "assistant_truncated",
                      f"no assistant token falls within the first {context_length} tokens, so nothing would be learned")
    result.examples = counted
    sizes = [ex.total_tokens for ex in counted]
    result.total_tokens = sum(sizes)
    result.trainable_tokens = sum(ex.trainable_tokens for ex in counted)
    if sizes:
        result.min_tokens, result.max_tokens = min(sizes), max(sizes)
        result.mean_tokens = result.total_tokens / len(sizes)


def _finish(result: ValidationResult, c: _Collector) -> ValidationResult:
    result.problems, result.problems_omitted = c.problems, c.omitted
    return result


def find_overlap(train: ValidationResult, valid: ValidationResult) -> list[tuple[int, int]]:
    """(training line, validation line) pairs of identical conversations: leaked validation examples."""
    seen: dict[str, list[int]] = defaultdict(list)
    for ex in train.examples:
        seen[json.dumps(ex.messages, sort_keys=True)].append(ex.line)
    return [(t, ex.line) for ex in valid.examples for t in seen.get(json.dumps(ex.messages, sort_keys=True), [])]


# ---------------------------------------------------------------------------------------------- preview

def auto_n_epochs(n_examples: int) -> int:
    """OpenAI's "auto" rule: 3 epochs, raised so tiny files see ≥ 100 example passes (at most 25 epochs),
    lowered so huge files see ≤ 25,000 (at least 1)."""
    if n_examples <= 0:
        raise ValueError("n_examples must be positive")
    if n_examples * 3 < 100:
        return min(25, -(-100 // n_examples))
    if n_examples * 3 > 25_000:
        return max(1, 25_000 // n_examples)
    return 3


def estimate_cost_cents(tokens_per_epoch: int, n_epochs: int, price_cents_per_million: int | Decimal) -> int:
    """Billed cost in integer cents: tokens in the training file × epochs × price, rounded up to a cent.

    Exact decimal arithmetic (no float drift in money; prices may carry sub-cent decimals); validation
    tokens are free, as at OpenAI.
    """
    if min(tokens_per_epoch, n_epochs, price_cents_per_million) < 0:
        raise ValueError("tokens, epochs and price must be >= 0")
    cents = Decimal(tokens_per_epoch * n_epochs) * Decimal(price_cents_per_million) / 1_000_000
    return int(cents.to_integral_value(rounding=ROUND_CEILING))
