"""The dataset validator: every fault with its line and code, statistics, tokens and the cost preview."""

import json
import tracemalloc

import pytest

from finetune import validation
from finetune.estimates import auto_n_epochs, estimate_cost_cents
from finetune.templating import tokenize_chat_example
from finetune.validation import MAX_DUPLICATE_GROUPS, MAX_JSON_DEPTH, find_overlap, validate_jsonl, validate_stream


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


# ---- tool calling (OpenAI's fine-tuning format) ----------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def call(call_id="call_1", name="get_weather", arguments='{"city": "Paris"}'):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def calling(*calls, content=None):
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


def result(call_id="call_1", content="22 C"):
    return {"role": "tool", "tool_call_id": call_id, "content": content}


ASK = {"role": "user", "content": "What is the weather in Paris?"}
ANSWER = {"role": "assistant", "content": "It is 22 C."}


def tool_chat(city="Paris", **extra):
    return {"tools": [WEATHER], "messages": [
        {"role": "user", "content": f"What is the weather in {city}?"},
        calling(call(arguments=json.dumps({"city": city}))), result(), ANSWER], **extra}


def test_a_tool_calling_dataset_validates_and_counts_the_calls_as_trainable(tiny_tokenizer):
    data = jsonl(*(tool_chat(f"city {i}") for i in range(10)),
                 {"tools": [WEATHER], "parallel_tool_calls": True, "messages": [  # 11: two calls at once
                     ASK, calling(call("a"), call("b", arguments='{"city": "Rome"}'), content=""),
                     result("b", "25 C"), result("a"), ANSWER]},
                 {"messages": [ASK, calling(call())]},  # 12: learn the call only; no tools declared
                 {"tools": [WEATHER], "messages": [ASK, {"role": "assistant", "content": "Which Paris?"}]})  # 13
    result_ = validate_jsonl(data, tokenizer=tiny_tokenizer, context_length=1024)
    assert result_.ok, result_.problems
    assert [ex.tools for ex in result_.examples] == [[WEATHER]] * 11 + [None, [WEATHER]]

    first = result_.examples[0]
    ids, mask = tokenize_chat_example(tiny_tokenizer, first.messages, first.tools)
    assert (first.total_tokens, first.trainable_tokens) == (len(ids), sum(mask))
    rendered = tiny_tokenizer.decode(ids, skip_special_tokens=False)
    assert rendered == ('<|bos|><|tools|>' + json.dumps([WEATHER]) + '<|end|><|user|>What is the weather in city 0?<|end|>'
                        '<|assistant|><|tool_call|>{"name": "get_weather", "arguments": {"city": "city 0"}}<|end|><|eos|>'
                        '<|tool|>22 C<|end|><|assistant|>It is 22 C.<|end|><|eos|>')
    trained = tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == ('<|tool_call|>{"name": "get_weather", "arguments": {"city": "city 0"}}<|end|><|eos|>'
                       'It is 22 C.<|end|><|eos|>')

    parallel = result_.examples[10]
    ids, mask = tokenize_chat_example(tiny_tokenizer, parallel.messages, parallel.tools)
    assert tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == (
        '<|tool_call|>{"name": "get_weather", "arguments": {"city": "Paris"}}'
        '<|tool_call|>{"name": "get_weather", "arguments": {"city": "Rome"}}<|end|><|eos|>It is 22 C.<|end|><|eos|>')
    assert result_.total_tokens == sum(ex.total_tokens for ex in result_.examples)
    assert result_.trainable_tokens == sum(ex.trainable_tokens for ex in result_.examples)


def test_weight_zero_on_a_tool_call_leaves_only_the_answer_trainable(tiny_tokenizer):
    messages = [ASK, {**calling(call()), "weight": 0}, result(), ANSWER]
    ids, mask = tokenize_chat_example(tiny_tokenizer, messages, [WEATHER])
    assert tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "It is 22 C.<|end|><|eos|>"


def test_prefixes_of_a_tool_conversation_render_as_prefixes_of_the_whole(tiny_tokenizer):
    """tokenize_chat_example finds trainable spans by re-rendering prefixes; tool messages must not break that."""
    from finetune.templating import _render

    messages = [{"role": "system", "content": "Be brief."}, ASK,
                calling(call("a"), call("b", arguments='{"city": "Rome"}'), content="Checking."),
                result("a"), result("b", "25 C"), ANSWER,
                {"role": "user", "content": "And tomorrow?"}, calling(call("c")), result("c", "18 C"),
                {"role": "assistant", "content": "18 C."}]
    for tools in ([WEATHER], None):
        whole = _render(tiny_tokenizer, messages, tools=tools)
        assert ("get_weather" in whole.split("<|user|>")[0]) == bool(tools)  # the definitions come first
        for k in range(len(messages) + 1):
            assert whole.startswith(_render(tiny_tokenizer, messages[:k], tools=tools)), k
            if k < len(messages) and messages[k]["role"] == "assistant":
                prompt = _render(tiny_tokenizer, messages[:k], add_generation_prompt=True, tools=tools)
                assert whole.startswith(prompt) and prompt.endswith("<|assistant|>"), k
        ids, mask = tokenize_chat_example(tiny_tokenizer, messages, tools)
        assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == whole


def test_every_tool_calling_fault_is_reported_with_line_and_path():
    plain = [ASK, ANSWER]
    lines = [
        tool_chat(),                                                                                   # 1 ok
        {"messages": [ASK, {"role": "assistant", "tool_calls": call()}]},                               # 2
        {"messages": [ASK, calling(call(arguments={"city": "Paris"}))]},                               # 3
        {"messages": [ASK, calling(call(arguments='{"city": Paris}'))]},                               # 4
        {"messages": [ASK, calling(call(arguments='["Paris"]'))]},                                     # 5
        {"tools": [WEATHER], "messages": [ASK, calling(call(name="get_time", arguments="{}"))]},        # 6
        {"messages": [ASK, calling(call()), {"role": "tool", "content": "22 C"}, ANSWER]},               # 7
        {"messages": [ASK, calling(call()), result(), result("call_9"), ANSWER]},                      # 8
        {"messages": [ASK, calling(call(), call())]},                                                  # 9
        {"messages": [ASK, {"role": "assistant"}]},                                                    # 10
        {"messages": [ASK, {"role": "assistant", "content": None}]},                                   # 11
        {"messages": [{**ASK, "tool_calls": [call()]}, ANSWER]},                                       # 12
        {"tools": ["get_weather", {"type": "func", "function": {"name": "bad name", "parameters": "x", "extra": 1}},
                   WEATHER, WEATHER], "messages": plain},                                              # 13
        {"tools": {"get_weather": {}}, "messages": plain},                                             # 14
        {"messages": [ASK, {**ANSWER, "tool_call_id": "call_1"}]},                                     # 15
        {"parallel_tool_calls": False, "messages": [ASK, calling(call("a"), call("b"))]},              # 16
        {"parallel_tool_calls": "yes", "messages": plain},                                             # 17
        {"messages": [ASK, calling(call()), {"role": "user", "content": "and?"}, ANSWER]},              # 18
        {"messages": [ASK, calling(call()), result(), result(), ANSWER]},                              # 19
        {"messages": [ASK, calling("x", {"type": "fn", "function": {"name": "get_weather", "arguments": "{}"},
                                         "extra": 1})]},                                              # 20
        {"tools": [], "messages": plain},                                                              # 21
        {"messages": [ASK, {"role": "assistant", "content": None, "tool_calls": []}]},                 # 22
        {"messages": [ASK, calling({"id": "c", "type": "function", "function": "get_weather"})]},      # 23
        {"messages": [ASK, calling(call(name="get weather"))]},                                        # 24
    ]
    result_ = validate_jsonl(jsonl(*lines))
    tc = "messages[1].tool_calls"
    assert {(p.line, p.path, p.code) for p in result_.problems} == {
        (2, tc, "tool_calls_not_list"),
        (3, f"{tc}[0].function.arguments", "arguments_not_string"),
        (4, f"{tc}[0].function.arguments", "arguments_invalid_json"),
        (5, f"{tc}[0].function.arguments", "arguments_not_object"),
        (6, f"{tc}[0].function.name", "undeclared_function"),
        (7, "messages[2].tool_call_id", "missing_tool_call_id"), (7, tc, "missing_tool_result"),
        (8, "messages[3].tool_call_id", "unknown_tool_call_id"),
        (9, f"{tc}[1].id", "duplicate_tool_call_id"),
        (10, "messages[1].content", "missing_content"),
        (11, "messages[1].content", "content_not_string"),
        (12, "messages[0].tool_calls", "tool_calls_not_on_assistant"),
        (13, "tools[0]", "tool_not_object"), (13, "tools[1].type", "invalid_tool_type"),
        (13, "tools[1].function.name", "invalid_function_name"),
        (13, "tools[1].function.parameters", "invalid_tool_parameters"),
        (13, "tools[1].function.extra", "unknown_tool_key"), (13, "tools[3].function.name", "duplicate_tool_name"),
        (14, "tools", "tools_not_list"),
        (15, "messages[1].tool_call_id", "tool_call_id_not_on_tool"),
        (16, tc, "parallel_tool_calls_disabled"),
        (17, "parallel_tool_calls", "invalid_parallel_tool_calls"),
        (18, tc, "missing_tool_result"),
        (19, "messages[3].tool_call_id", "duplicate_tool_result"),
        (20, f"{tc}[0]", "tool_call_not_object"), (20, f"{tc}[1].id", "invalid_tool_call_id"),
        (20, f"{tc}[1].type", "invalid_tool_call_type"), (20, f"{tc}[1].extra", "unknown_tool_call_key"),
        (21, "tools", "tools_empty"),
        (22, tc, "tool_calls_empty"),
        (23, f"{tc}[0].function", "invalid_tool_call_function"),
        (24, f"{tc}[0].function.name", "invalid_function_name"),
    }
    assert [ex.line for ex in result_.examples] == [1]
    by_code = {p.code: p.message for p in result_.problems}
    assert "'get_time' is not declared in tools (declared: get_weather)" in by_code["undeclared_function"]
    assert "column 10" in by_code["arguments_invalid_json"]
    assert "null content is only allowed beside tool_calls" in by_code["content_not_string"]
    assert "'call_9'" in by_code["unknown_tool_call_id"] and "'call_1'" in by_code["missing_tool_result"]
    assert all(p.message for p in result_.problems)


# Templates of base models that know nothing of tools: one refuses the role, one silently drops calls and definitions.
NO_TOOL_ROLE = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
                "{{ raise_exception('Unsupported role: ' + m['role']) }}{% endif %}"
                "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
DROPS_TOOLS = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{{ m['content'] or '' }}{{ '<|end|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


@pytest.mark.parametrize("template, lines", [
    (NO_TOOL_ROLE, {13: "Unsupported role: tool", 14: "drops the call to 'get_weather' in messages[1]"}),
    (DROPS_TOOLS, {13: "does not render the tool definitions", 14: "drops the call to 'get_weather' in messages[1]"}),
])
def test_a_template_without_tool_support_is_reported(tiny_model_path, template, lines):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tokenizer.chat_template = template
    with_tools = tool_chat()
    with_tools["messages"][1]["content"] = "Checking."
    data = valid_file() + jsonl(with_tools, {"messages": [ASK, calling(call(), content="Checking.")]})
    result_ = validate_jsonl(data, tokenizer=tokenizer)
    assert [(p.line, p.code) for p in result_.problems] == [(line, "template_error") for line in lines]
    for problem in result_.problems:
        assert lines[problem.line] in problem.message


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


# ---- streaming: bounded memory, nesting depth, long lines -------------------------------------------------------

def test_a_line_nested_too_deep_is_a_problem_of_its_line_not_a_recursion_error():
    deep_list = "[" * 100_000 + "]" * 100_000
    deep_content = '{"messages": [{"content": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}]}"
    deep_arguments = {"messages": [ASK, calling(call(arguments='{"a": ' * 5000 + "1" + "}" * 5000))]}
    just_enough = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH  # 64 levels: read, and then not an object
    brackets_in_a_string = chat("[" * 200, "{" * 200)  # not nesting
    result = validate_jsonl(jsonl(*(chat(f"q{i}", "a") for i in range(10)), deep_list, deep_content, deep_arguments,
                                  just_enough, brackets_in_a_string))
    assert [(p.line, p.path, p.code) for p in result.problems] == [
        (11, "", "nesting_too_deep"), (12, "", "nesting_too_deep"),
        (13, "messages[1].tool_calls[0].function.arguments", "arguments_too_deep"), (14, "", "not_an_object")]
    assert f"more than {MAX_JSON_DEPTH} levels deep" in result.problems[0].message
    assert [ex.line for ex in result.examples][-1] == 15


@pytest.mark.slow
def test_a_large_file_is_validated_line_by_line_without_keeping_its_examples(tmp_path):
    path, filler = tmp_path / "big.jsonl", "lorem ipsum dolor sit amet " * 35
    with open(path, "w") as out:
        n = 0
        while out.tell() < 20 * 1024 * 1024:
            out.write(json.dumps(chat(f"question {n} {filler}", f"answer {n}")) + "\n")
            n += 1
    progress = []
    tracemalloc.start()
    try:
        with open(path, "rb") as stream:
            result = validate_stream(stream, filename="big.jsonl",
                                     on_progress=lambda lines, nbytes: progress.append((lines, nbytes)) if lines % 1000 == 0 else None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.ok and result.example_count == n and result.examples == []  # counted, not kept
    assert (result.lines, result.bytes) == (n, path.stat().st_size)
    assert progress[0] == (1000, progress[0][1]) and progress == sorted(progress) and len(progress) == n // 1000
    assert peak < 2 * 1024 * 1024, f"{peak:,} bytes held to validate {result.bytes:,}"


def test_a_line_over_the_length_limit_is_reported_without_being_held(monkeypatch):
    monkeypatch.setattr(validation, "MAX_LINE_BYTES", 1000)
    long_line = json.dumps(chat("x" * 5000, "y"))
    result = validate_jsonl(valid_file() + long_line.encode() + b"\n" + jsonl(chat("after", "it")))
    assert [(p.line, p.code) for p in result.problems] == [(13, "line_too_long")]
    assert f"this line is {len(long_line) + 1:,} bytes" in result.problems[0].message
    assert result.examples[-1].line == 14 and result.lines == 14


def test_duplicate_groups_are_listed_up_to_a_cap_and_all_counted():
    rows = [chat(f"q{i % 150}", "a") for i in range(300)]  # 150 groups of two
    result = validate_jsonl(jsonl(*rows))
    assert result.duplicate_groups == 150 and len(result.duplicates) == MAX_DUPLICATE_GROUPS
    assert result.duplicates[:2] == [[1, 151], [2, 152]]  # by first line
    assert result.stats()["duplicate_groups"] == 150
