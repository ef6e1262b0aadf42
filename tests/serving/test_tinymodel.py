import hashlib

from devbackend.tinymodel import build_tiny_model, read_model_id


def _digests(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_two_builds_have_the_same_bytes(tiny_model_path, tmp_path):
    again = build_tiny_model(tmp_path / "again", model_id="platform/tiny-chat")
    assert _digests(again) == _digests(tiny_model_path)
    assert {"model.safetensors", "tokenizer.json", "config.json", "platform_model.json"} <= set(_digests(again))


def test_a_complete_build_is_not_redone(tiny_model_path):
    before = {f.name: f.stat().st_mtime_ns for f in tiny_model_path.iterdir()}
    assert build_tiny_model(tiny_model_path, model_id="platform/tiny-chat") == tiny_model_path
    assert {f.name: f.stat().st_mtime_ns for f in tiny_model_path.iterdir()} == before  # not one file written again
    assert read_model_id(tiny_model_path) == "platform/tiny-chat"


def test_loads_renders_the_chat_template_and_generates(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert 400 <= len(tokenizer) <= 520
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.hidden_size // model.config.num_attention_heads == 32  # a head size vLLM serves
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|bos|><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>"
    rendered = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "Yes."}], tokenize=False)
    assert rendered.endswith("<|assistant|>Yes.<|end|><|eos|>")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids[0]) == prompt  # the special tokens are single tokens that round-trip
    output = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > ids.shape[1]


def test_the_chat_template_renders_tools_calls_and_results(tiny_model_path):
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
                {"role": "tool", "tool_call_id": "a", "content": "22 C"}]
    rendered = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|bos|><|tools|>" + json.dumps(tools) + "<|end|><|user|>Weather?<|end|><|assistant|>"
                        '<|tool_call|>{"name": "get_weather", "arguments": {"city": "Paris"}}'
                        '<|tool_call|>{"name": "get_weather", "arguments": {"city":"Rome"}}<|end|><|eos|>'
                        "<|tool|>22 C<|end|><|assistant|>")
    # Without tools nothing changes: the rendering of builder version 1.
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False) == "<|bos|><|user|>Weather?<|end|>"
