"""The dataset validator: every fault with its line and code, statistics, tokens and the cost preview."""

import json

import pytest

from finetune.validation import (
    auto_n_epochs,
    estimate_cost_cents,
    find_overlap,
    tokenize_chat_example,
    validate_jsonl,
)


def chat(user="Hello there", answer="The answer is 42.", **extra):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra}


def jsonl(*records, sep="\n"):
    return sep.join(r if isinstance(r, str) else json.dumps(r) for r in records).encode() + b"\n"


def valid_file(n=12, sep="\n"):
    return jsonl(*(chat(f"question {i}", f"answer {i}") for i in range(n)), sep=sep)


def msgs(*pairs):
    return {"messages": [dict(role=r, content=c) if isinstance(c, str) or c is None else dict(role=r, **c)
                         for r, c in pairs]}


def test_every_fault_is_reported_with_line_and_code():
    U, A = ("user", "Hi"), ("assistant", "Hello")
    lines = [
        json.dumps(chat()),                                                         # 1 ok
        '{"messages": [',                                                           # 2
        "[1, 2]",                                                                   # 3
        '{"foo": 1}',                                                               # 4
        json.dumps(chat(extra=1)),                                                  # 5
        '{"messages": "hi"}',                                                       # 6
        '{"messages": []}',                                                         # 7
        json.dumps({"messages": ["x", {"role": "assistant", "content": "a"}]}),     # 8
        json.dumps(msgs(("bot", "Hi"), A)),                                         # 9
        json.dumps(msgs(U, ("system", "Be brief"), A)),                             # 10
        json.dumps(msgs(U)),                                                        # 11
        json.dumps(msgs(U, A, U)),                                                  # 12
        json.dumps(msgs(U, ("assistant", "  "))),                                   # 13
        json.dumps(msgs(U, ("assistant", {"content": 5}))),                         # 14
        json.dumps(msgs(U, ("assistant", {"content": "a", "weight": 2}))),          # 15
        json.dumps(msgs(("user", {"content": "q", "weight": 1}), A)),               # 16
        json.dumps(msgs(U, ("assistant", {"content": "a", "weight": 0}))),          # 17
        json.dumps(msgs(U, ("assistant", {"content": "a", "foo": 1}))),             # 18
        json.dumps({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}),  # 19
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}),  # 20
        json.dumps({"prompt": "q", "completion": "a"}),                             # 21
        b'{"messages": "\xff"}',                                                    # 22
        "",                                                                         # 23 blank: ignored
        json.dumps(msgs(U, ("assistant", {"content": "a", "weight": True}))),       # 24
    ]
    data = b"\r\n".join(l if isinstance(l, bytes) else l.encode() for l in lines)
    result = validate_jsonl(data, filename="train.json", min_examples=30)
    assert {(p.line, p.code) for p in result.problems} == {
        (None, "wrong_extension"), (2, "invalid_json"), (3, "not_an_object"), (4, "unknown_format"),
        (5, "unknown_key"), (6, "messages_not_list"), (7, "messages_empty"), (8, "message_not_object"),
        (9, "invalid_role"), (10, "system_not_first"), (11, "no_assistant_message"), (12, "last_not_assistant"),
        (13, "empty_content"), (14, "content_not_string"), (15, "invalid_weight"), (16, "weight_not_on_assistant"),
        (17, "no_trainable_message"), (18, "unknown_message_key"), (19, "missing_role"), (20, "missing_content"),
        (21, "mixed_format"), (22, "invalid_utf8"), (24, "invalid_weight"), (None, "too_few_examples"),
    }
    assert not result.ok
    assert [ex.line for ex in result.examples] == [1]
    by_line = {p.line: p for p in result.problems}
    assert by_line[5].path == "extra"
    assert by_line[10].path == "messages[1].role"
    assert by_line[14].path == "messages[1].content"
    assert by_line[18].path == "messages[1].foo"
    assert all(p.message for p in result.problems)


def test_valid_file_passes_with_stats():
    result = validate_jsonl(valid_file(), filename="train.jsonl")
    assert result.ok, result.problems
    assert result.format == "chat"
    assert result.stats()["examples"] == 12
    assert result.duplicates == []
    assert result.to_dict()["ok"] is True


def test_prompt_completion_format_is_accepted_and_normalised():
    data = jsonl(*({"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)))
    result = validate_jsonl(data)
    assert result.ok and result.format == "prompt_completion"
    assert result.examples[0].messages == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}]


def test_crlf_blank_lines_and_bom():
    data = b"\xef\xbb\xbf" + valid_file(sep="\r\n\r\n  \r\n")
    result = validate_jsonl(data)
    assert result.ok, result.problems
    assert [ex.line for ex in result.examples][:3] == [1, 4, 7]


def test_invalid_utf8_reports_the_line_and_keeps_going():
    data = valid_file() + b'{"messages": "caf\xe9"}\n' + jsonl(chat("late", "late"))
    result = validate_jsonl(data)
    assert [(p.line, p.code) for p in result.problems] == [(13, "invalid_utf8")]
    assert "byte 18" in result.problems[0].message
    assert result.examples[-1].line == 14


def test_json_error_column():
    result = validate_jsonl(valid_file() + b'{"messages": }\n')
    (problem,) = result.problems
    assert (problem.line, problem.code) == (13, "invalid_json")
    assert "column 14" in problem.message


def test_empty_and_too_large_files():
    assert [p.code for p in validate_jsonl(b"\n \r\n").problems] == ["empty_file"]
    assert [p.code for p in validate_jsonl(valid_file(), max_bytes=100).problems] == ["file_too_large"]


def test_problem_cap_counts_the_rest():
    result = validate_jsonl(b"[]\n" * 50, max_problems=10)
    assert len(result.problems) == 10 and result.problems_omitted == 40


def test_duplicates_and_overlap():
    train = validate_jsonl(valid_file() + jsonl(chat("question 3", "answer 3"), chat("question 3", "answer 3")))
    assert train.duplicates == [[4, 13, 14]]
    valid = validate_jsonl(jsonl(chat("new", "x"), chat("question 5", "answer 5")), min_examples=1)
    assert find_overlap(train, valid) == [(6, 2)]


def test_loss_mask_covers_only_trainable_assistant_turns(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Yes.", "weight": 0},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "The answer is 42."},
    ]
    ids, mask = tokenize_chat_example(tiny_tokenizer, messages)
    assert len(ids) == len(mask)
    full = tiny_tokenizer.apply_chat_template([{k: m[k] for k in ("role", "content")} for m in messages], tokenize=False)
    assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == full
    trained = tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == "The answer is 42.<|end|><|eos|>"


def test_token_counts_and_context_checks(tiny_tokenizer):
    long_prompt = "the cat sees a book today " * 20
    data = jsonl(*(chat(f"question {i}", "The answer is 42.") for i in range(10)),
                 {"messages": [{"role": "system", "content": long_prompt},
                               {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]},
                 chat("Hi", "Yes. " + long_prompt))
    result = validate_jsonl(data, tokenizer=tiny_tokenizer, context_length=64)
    assert {(p.line, p.code) for p in result.problems} == {(11, "too_long"), (11, "assistant_truncated"), (12, "too_long")}
    first = result.examples[0]
    ids, mask = tokenize_chat_example(tiny_tokenizer, first.messages)
    assert (first.total_tokens, first.trainable_tokens) == (len(ids), sum(mask))
    answer = len(tiny_tokenizer("The answer is 42.<|end|><|eos|>", add_special_tokens=False)["input_ids"])
    assert first.trainable_tokens == answer
    assert result.total_tokens == sum(ex.total_tokens for ex in result.examples)
    assert result.trainable_tokens == sum(ex.trainable_tokens for ex in result.examples)
    assert result.min_tokens <= result.mean_tokens <= result.max_tokens > 64


def test_template_rejecting_a_role_is_reported(tiny_tokenizer):
    data = valid_file() + jsonl(msgs(("user", "q"), ("tool", "{}"), ("assistant", "a")))
    result = validate_jsonl(data, tokenizer=tiny_tokenizer)
    assert [(p.line, p.code) for p in result.problems] == [(13, "template_error")]


def test_cost_preview_is_exact_integer_cents():
    assert estimate_cost_cents(1_000_000, 3, 800) == 2400
    assert estimate_cost_cents(1, 1, 800) == 1            # 0.0008 cents rounds up to one cent
    assert estimate_cost_cents(1_234_567, 3, 300) == 1112  # 1111.1103 → 1112
    assert estimate_cost_cents(0, 3, 800) == 0
    assert estimate_cost_cents(10**12, 25, 2500) == 62_500_000_000  # no float rounding at scale
    with pytest.raises(ValueError):
        estimate_cost_cents(-1, 3, 800)


@pytest.mark.parametrize("n, epochs", [(10, 10), (4, 25), (1, 25), (34, 3), (50, 3), (8333, 3), (8334, 2), (100_000, 1)])
def test_auto_epochs(n, epochs):
    assert auto_n_epochs(n) == epochs
