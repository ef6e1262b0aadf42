"""Evaluating an adapter against the base model on chat rows: the rows, the metrics and the greedy run. No Django here.

A row of the tenant's chat file is a conversation; its last assistant message is the expected answer and the messages
before it are the prompt (a row of a preference file: its input, and its preferred output as the expected answer). Each row is answered twice by the same loaded model, the adapter disabled (base) and
enabled (adapter), greedily (argmax, no sampling), at most `max_tokens` new tokens. Per row and side:

- exact match: the answer equals the expected answer once both are stripped of surrounding whitespace and runs of
  whitespace are made one space (case counts);
- contains: the expected answer, so normalised and case-folded, appears in the answer, so normalised and case-folded;
- loss: the mean negative log-likelihood (nats per token) of the expected answer's tokens given the prompt, teacher
  forced: the tokens the trainer takes its loss on (finetune.templating.tokenize_chat_example, the end-of-turn marker
  included).

A side's summary: exact match and contains as the fraction of rows, loss as the token-weighted mean over all rows
(sum of NLLs / answer tokens, as the trainer's validation loss).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from finetune.templating import SystemPrompt, tokenize_chat_example, with_system_prompt

_SPACE = re.compile(r"\s+")
SIDES = ("base", "adapter")


def normalize(text: str) -> str:
    return _SPACE.sub(" ", text or "").strip()


def exact_match(answer: str, expected: str) -> bool:
    return normalize(answer) == normalize(expected)


def contains(answer: str, expected: str) -> bool:
    want = normalize(expected).casefold()
    return bool(want) and want in normalize(answer).casefold()


def message_text(content: Any) -> str:
    """A message's content as text (a list of parts: its text parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return ""


@dataclass(frozen=True)
class EvalRow:
    line: int
    prompt: list[dict[str, Any]]
    expected: str
    tools: list[dict[str, Any]] | None = None


def rows_from_examples(examples: Sequence[Any], system_prompt: SystemPrompt | None = None) -> tuple[list[EvalRow], int]:
    """(rows, skipped): one row per example whose last assistant message has text content; that message is the
    expected answer and the messages before it the prompt. Examples with no such message are skipped (counted).
    A preference example (the validator's, with `preferred_output`) is its input then its preferred output: the
    preferred answer is the expected one. The prompt carries `system_prompt` as the gateway would serve it
    (with_system_prompt), so both sides answer what the gateway would send them."""
    rows, skipped = [], 0
    for i, ex in enumerate(examples, start=1):
        messages = getattr(ex, "messages", None) or (ex["messages"] if isinstance(ex, dict) else ex)
        tools = getattr(ex, "tools", None) or (ex.get("tools") if isinstance(ex, dict) else None)
        messages = [*messages, *(getattr(ex, "preferred_output", None) or [])]
        last = max((j for j, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        expected = message_text(messages[last].get("content")) if last is not None else ""
        if last is None or not expected.strip() or last == 0:
            skipped += 1
            continue
        prompt = with_system_prompt([{k: v for k, v in m.items() if k != "weight"} for m in messages[:last]],
                                    system_prompt)
        rows.append(EvalRow(getattr(ex, "line", i), prompt, expected, tools))
    return rows, skipped


@dataclass
class SideResult:
    answer: str
    exact: bool
    contains: bool
    loss: float  # mean NLL per answer token
    nll_sum: float


@dataclass
class RowResult:
    row: EvalRow
    answer_tokens: int
    base: SideResult
    adapter: SideResult

    @property
    def differs(self) -> bool:
        return self.base.answer != self.adapter.answer


def score(answer: str, expected: str, nll_sum: float, tokens: int) -> SideResult:
    return SideResult(answer, exact_match(answer, expected), contains(answer, expected), nll_sum / max(tokens, 1), nll_sum)


def summarize(results: Sequence[RowResult]) -> dict[str, dict[str, Any]]:
    """Per side: rows, exact_match and contains (fractions of rows), loss (token-weighted mean NLL); and `differing`,
    the rows whose two answers differ."""
    n = len(results)
    tokens = sum(r.answer_tokens for r in results)
    out: dict[str, Any] = {}
    for side in SIDES:
        sides = [getattr(r, side) for r in results]
        out[side] = {"rows": n,
                     "exact_match": sum(s.exact for s in sides) / n if n else None,
                     "contains": sum(s.contains for s in sides) / n if n else None,
                     "loss": sum(s.nll_sum for s in sides) / tokens if tokens else None}
    out["differing_rows"] = sum(r.differs for r in results)
    out["answer_tokens"] = tokens
    return out


# ---------------------------------------------------------------------------------------------- the model run

def load_model(base_model_path: str, adapter_path: str, device: str | None = None):
    """(model, tokenizer, device): the base model (bf16 on CUDA, fp32 on CPU) with the adapter loaded, in eval mode.
    `model.disable_adapter()` gives the base model's answers from the same weights."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    base = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=dtype).to(dev)
    model = PeftModel.from_pretrained(base, adapter_path).to(dev)
    model.eval()
    return model, tokenizer, dev


def _answer_ids(tokenizer, row: EvalRow) -> tuple[list[int], list[bool]]:
    """The conversation with the expected answer, and which tokens are that answer's (the trainer's mask)."""
    earlier = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in row.prompt]
    return tokenize_chat_example(tokenizer, [*earlier, {"role": "assistant", "content": row.expected}], row.tools)


def _nll_sum(model, ids: list[int], mask: list[bool], dev) -> tuple[float, int]:
    import torch

    input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
    logits = model(input_ids=input_ids).logits[0, :-1].float()
    targets = input_ids[0, 1:]
    keep = torch.tensor(mask[1:], dtype=torch.bool, device=dev)
    nll = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    return float(nll.item()), int(keep.sum().item())


def _generate(model, tokenizer, row: EvalRow, max_tokens: int, dev) -> str:
    import torch

    from common.chat import template_message

    text = tokenizer.apply_chat_template([template_message(m) for m in row.prompt], tools=row.tools or None,
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(dev)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         do_sample=False, num_beams=1, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def evaluate_row(model, tokenizer, row: EvalRow, *, max_tokens: int, dev) -> RowResult:
    """Both sides of one row, from the same loaded model (adapter disabled, then enabled)."""
    import torch

    ids, mask = _answer_ids(tokenizer, row)
    with torch.no_grad():
        with model.disable_adapter():
            base_nll, tokens = _nll_sum(model, ids, mask, dev)
            base_answer = _generate(model, tokenizer, row, max_tokens, dev)
        adapter_nll, _ = _nll_sum(model, ids, mask, dev)
        adapter_answer = _generate(model, tokenizer, row, max_tokens, dev)
    return RowResult(row, tokens, score(base_answer, row.expected, base_nll, tokens),
                     score(adapter_answer, row.expected, adapter_nll, tokens))


def evaluate_rows(model, tokenizer, rows: Sequence[EvalRow], *, max_tokens: int, dev,
                  on_row: Callable[[int, RowResult], None] = lambda i, r: None,
                  should_stop: Callable[[], bool] = lambda: False) -> list[RowResult]:
    """Every row in order; `on_row(index, result)` after each (progress); stops early when `should_stop()`."""
    results = []
    for i, row in enumerate(rows):
        if should_stop():
            break
        result = evaluate_row(model, tokenizer, row, max_tokens=max_tokens, dev=dev)
        results.append(result)
        on_row(i, result)
    return results


def as_dict(result: RowResult) -> dict[str, Any]:
    return {"line": result.row.line, "prompt": result.row.prompt, "expected": result.row.expected,
            "answer_tokens": result.answer_tokens, "base": asdict(result.base), "adapter": asdict(result.adapter)}
