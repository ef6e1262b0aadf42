"""Chat examples as the model sees them: the chat template's rendering and which of its tokens are trained.

The one tokenization the trainer and the validator share (`tokenize_chat_example`). Pure library code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from common.chat import inject_system_prompt, template_message


@dataclass(frozen=True)
class SystemPrompt:
    """The system prompt a job trains with (or an evaluation scores with): the tenant's prompt text as the gateway
    serves it (stripped) and its `system_message_rule` ("keep" | "replace")."""

    text: str
    rule: str = "keep"


def with_system_prompt(messages: Sequence[dict[str, Any]], prompt: SystemPrompt | None) -> list[dict[str, Any]]:
    """The messages as the gateway sends them to the model: the same `inject_system_prompt`, or unchanged (None)."""
    if prompt is None:
        return list(messages)
    return inject_system_prompt(list(messages), prompt.text, prompt.rule)


def to_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Chat messages of a record in either accepted format (prompt/completion → one user/assistant turn)."""
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]


def _render(tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
            tools: list[dict[str, Any]] | None = None) -> str:
    if not messages and not add_generation_prompt:
        return ""
    return tokenizer.apply_chat_template([template_message(m) for m in messages], tools=tools or None,
                                         tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_chat_example(tokenizer, messages: Sequence[dict[str, Any]],
                          tools: list[dict[str, Any]] | None = None) -> tuple[list[int], list[bool]]:
    """Render with the chat template and mark trainable tokens; the one tokenization trainer and validator share.

    A token is trainable when it overlaps the text an assistant message (weight ≠ 0) adds after its
    generation prompt: its content, its tool calls and its end-of-turn marker, so the model also learns to
    call and to stop. `tools` (OpenAI's function definitions) go to the template as transformers' `tools=`.
    The whole conversation is tokenized once (as at inference); spans come from re-rendering prefixes, which
    needs a template whose renderings of prefixes are prefixes of the whole (true for Llama/ChatML/Mistral
    styles). A template that silently drops tool definitions, calls or results is refused: the model would
    learn calls it never saw, or empty turns.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast tokenizer (with offset mappings) is required to find assistant tokens")
    full = _render(tokenizer, messages, tools=tools)
    for tool in tools or []:
        if tool["function"]["name"] not in full:
            raise ValueError(f"the chat template does not render the tool definitions (no trace of "
                             f"{tool['function']['name']!r}); choose a base model whose template supports tools")
    spans = []
    for i, message in enumerate(messages):
        role, calls = message.get("role"), message.get("tool_calls") or []
        if role == "tool" and message.get("content", "") not in full:
            raise ValueError(f"the chat template drops the tool result of messages[{i}]; "
                             "choose a base model whose template supports tool messages")
        trainable = role == "assistant" and message.get("weight", 1) != 0
        if not trainable and not calls:
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools))
        through = _render(tokenizer, messages[: i + 1], tools=tools)
        if not full.startswith(through) or not through.startswith(full[:start]):
            raise ValueError("the chat template does not render conversation prefixes as prefixes; "
                             "assistant tokens cannot be located")
        for call in calls:
            if call["function"]["name"] not in through[start:]:
                raise ValueError(f"the chat template drops the call to {call['function']['name']!r} in messages[{i}]; "
                                 "choose a base model whose template supports tool calls")
        if trainable:
            spans.append((start, len(through)))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [_overlaps(a, b, spans) for a, b in encoding["offset_mapping"]]
    return list(encoding["input_ids"]), mask


def _overlaps(a: int, b: int, spans: list[tuple[int, int]]) -> bool:
    """Character range [a, b) touches a trainable span; a zero-width token counts when inside one."""
    return any((a < hi and b > lo) if a < b else lo < a <= hi for lo, hi in spans)
