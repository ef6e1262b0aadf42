"""The dev backend against the real clients (huggingface_hub, openai) with the tiny model, and its simulator."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import openai
import pytest
from huggingface_hub import InferenceClient

from devbackend import BackendConfig, run_in_subprocess, run_in_thread
from tests.support.devbackend import call, greedy_ids

BASE_ID = "platform/tiny-chat"


# --- plain HTTP helpers (stdlib only, so nothing hides what goes over the wire) --------------------------------


def open_stream(url: str, path: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return connection, connection.getresponse()


def sse_events(url: str, path: str, body: dict) -> tuple[int, list[str]]:
    """(status, data payloads)."""
    connection, response = open_stream(url, path, body)
    try:
        return response.status, [line[5:].strip().decode() for line in response if line.startswith(b"data:")]
    finally:
        connection.close()


def raw_post(url: str, path: str, body: dict) -> bytes:
    """Everything the server sends until it closes: shows whether a chunked body got its final empty chunk."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def stats(url: str) -> dict:
    return call(url, "/_dev/stats")[2]


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


# --- servers ---------------------------------------------------------------------------------------------------


def _serve(config: BackendConfig):
    url, stop = run_in_thread(config)
    yield url
    stop()


@pytest.fixture(scope="module")
def dev_url(tiny_model_path, lora_adapter_path):
    yield from _serve(BackendConfig(model=str(tiny_model_path), lora_adapters={"startup": str(lora_adapter_path)}))


@pytest.fixture(scope="module")
def vllm_url(tiny_model_path):
    yield from _serve(BackendConfig(model=str(tiny_model_path), flavor="vllm"))


@pytest.fixture(scope="module")
def sim_tgi_url():
    yield from _serve(BackendConfig(simulate=True, flavor="tgi", max_concurrent_requests=2,
                                    sim_tokens_per_second=0, lora_adapters={"known": "/nowhere"}))


@pytest.fixture
def dev(dev_url):
    yield dev_url
    call(dev_url, "/_dev/faults/reset", {})


@pytest.fixture
def sim(sim_tgi_url):
    yield sim_tgi_url
    call(sim_tgi_url, "/_dev/faults/reset", {})


# --- TGI protocol through huggingface_hub -----------------------------------------------------------------------


def test_text_generation_with_details(dev, hub_client_for_local_servers):
    output = InferenceClient(base_url=dev).text_generation("Hello there", max_new_tokens=6, details=True,
                                                          do_sample=False)
    assert output.details.generated_tokens == 6 and output.details.finish_reason == "length"
    assert [token.id for token in output.details.tokens] == greedy_ids(dev, "Hello there", max_new_tokens=6)
    assert output.generated_text == "".join(t.text for t in output.details.tokens if not t.special)


def test_text_generation_stream(dev, hub_client_for_local_servers):
    client = InferenceClient(base_url=dev)  # keep a reference: the stream dies with the client
    events = list(client.text_generation("Hello there", max_new_tokens=5, details=True, stream=True, do_sample=False))
    assert [event.index for event in events] == [1, 2, 3, 4, 5]
    assert all(event.generated_text is None and event.details is None for event in events[:-1])
    assert events[-1].details.finish_reason == "length" and events[-1].details.generated_tokens == 5
    assert events[-1].details.input_length > 0
    assert [event.token.id for event in events] == greedy_ids(dev, "Hello there", max_new_tokens=5)


def test_generate_headers_and_validation(dev):
    status, headers, answer = call(dev, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
    assert status == 200 and set(answer) == {"generated_text"}
    assert headers["x-generated-tokens"] == "3" and int(headers["x-prompt-tokens"]) > 0
    assert {"x-queue-time", "x-inference-time", "x-compute-type"} <= set(headers)
    status, _, answer = call(dev, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 5000}})
    assert status == 422 and answer["error_type"] == "validation" and "max_new_tokens" in answer["error"]


def test_sampling_is_seeded_and_stop_sequences_stop(dev):
    parameters = {"max_new_tokens": 8, "do_sample": True, "seed": 7, "temperature": 0.8, "top_k": 50, "top_p": 0.9,
                  "details": True}
    first, second = (call(dev, "/generate", {"inputs": "Hello", "parameters": parameters})[2] for _ in range(2))
    assert first == second and first["details"]["seed"] == 7
    tokens = call(dev, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 8, "details": True}})[2]
    stop = tokens["details"]["tokens"][2]["text"]
    assert stop
    parameters = {"max_new_tokens": 8, "stop": [stop], "details": True}
    details = call(dev, "/generate", {"inputs": "Hello", "parameters": parameters})[2]["details"]
    assert details["finish_reason"] == "stop_sequence" and details["generated_tokens"] <= 3


def test_penalties_are_openais_additive_ones_over_the_generated_tokens(dev):
    import torch

    from devbackend.model_engine import ModelEngine
    from devbackend.protocol import GenerationParams

    params = GenerationParams(max_new_tokens=1, presence_penalty=0.5, frequency_penalty=2.0)
    penalized = ModelEngine._penalize(torch.zeros(8), params, [3, 3, 5])
    assert penalized.tolist() == [0, 0, 0, -4.5, 0, -2.5, 0, 0]  # 2·count + 0.5 for each token already generated
    assert ModelEngine._penalize(torch.zeros(8), GenerationParams(max_new_tokens=1), [3]).tolist() == [0] * 8

    # Greedy decoding of the random tiny model repeats tokens; a strong frequency penalty (greedy too) changes that.
    plain = call(dev, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 24, "details": True}})[2]
    ids = [t["id"] for t in plain["details"]["tokens"]]
    assert len(set(ids)) < len(ids), "the test needs a greedy answer that repeats a token"
    client = openai_client(dev)
    assert client.completions.create(model=BASE_ID, prompt="Hello", max_tokens=24, temperature=0).choices[0].text == plain["generated_text"]
    penalized = client.completions.create(model=BASE_ID, prompt="Hello", max_tokens=24, temperature=0, frequency_penalty=2,
                                          presence_penalty=2)
    assert penalized.choices[0].text != plain["generated_text"]
    status, _, answer = call(dev, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2, "frequency_penalty": 2.5}})
    assert status == 422 and answer["error"] == "`frequency_penalty` must be >= -2.0 and <= 2.0"


def test_generate_stream_reports_errors_as_an_event_with_status_200(dev):
    status, events = sse_events(dev, "/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 5000}})
    assert status == 200
    assert [json.loads(e)["error_type"] for e in events] == ["validation"]


def test_info_health_tokenize_metrics(dev):
    status, _, info = call(dev, "/info")
    assert info["model_id"] == BASE_ID and info["max_total_tokens"] == 1024 and info["max_input_tokens"] == 1023
    assert "adapters" not in info  # TGI does not list them
    assert call(dev, "/health")[:1] == (200,)
    tokens = call(dev, "/tokenize", {"inputs": "Hello there"})[2]
    assert "".join(t["text"] for t in tokens) == "Hello there"
    metrics = call(dev, "/metrics")[2]
    assert "tgi_request_count" in metrics and 'running_lora_adapters="startup"' in metrics


# --- OpenAI protocol through the openai SDK ---------------------------------------------------------------------


def test_chat_completion_and_stream_with_usage(dev):
    client = openai_client(dev)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    answer = client.chat.completions.create(model=BASE_ID, messages=messages, max_tokens=6, temperature=0,
                                            extra_body={"cache_salt": "tenant-a"})
    assert answer.usage.completion_tokens == 6 and answer.usage.prompt_tokens > 5
    assert answer.choices[0].finish_reason == "length"
    seen = stats(dev)
    assert seen["last_request"]["body"]["messages"][0] == messages[0] and seen["cache_salts"] >= 1

    chunks = list(client.chat.completions.create(model=BASE_ID, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == answer.choices[0].message.content
    plain = list(client.chat.completions.create(model=BASE_ID, messages=messages, max_tokens=2, stream=True))
    assert all(chunk.usage is None for chunk in plain)


def test_completions(dev):
    client = openai_client(dev)
    answer = client.completions.create(model=BASE_ID, prompt="Hello there", max_tokens=4, temperature=0)
    assert answer.usage.completion_tokens == 4 and answer.choices[0].finish_reason == "length"
    streamed = list(client.completions.create(model=BASE_ID, prompt="Hello there", max_tokens=4, temperature=0,
                                              stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == answer.choices[0].text


# --- adapters ---------------------------------------------------------------------------------------------------


def test_startup_adapter_changes_the_output_and_unknown_adapters_silently_run_the_base(dev):
    base = greedy_ids(dev, "Hello there")
    assert greedy_ids(dev, "Hello there", adapter_id="startup") != base
    assert greedy_ids(dev, "Hello there", adapter_id="no-such-adapter") == base  # TGI issue #2505, on purpose
    assert stats(dev)["last_request"]["adapter"] == BASE_ID
    client = openai_client(dev)
    def complete(model):
        return client.completions.create(model=model, prompt="Hello there", max_tokens=8, temperature=0).choices[0].text
    assert complete("no-such-adapter") == complete(BASE_ID) == complete("tgi") != complete("startup")


def test_runtime_lora_load_and_unload_vllm(vllm_url, lora_adapter_path):
    client = openai_client(vllm_url)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="runtime", prompt="Hello there", max_tokens=4, temperature=0)
    load = {"lora_name": "runtime", "lora_path": str(lora_adapter_path)}
    status, _, text = call(vllm_url, "/v1/load_lora_adapter", load)
    assert status == 200 and "runtime" in text
    assert call(vllm_url, "/v1/load_lora_adapter", {"lora_name": "runtime", "lora_path": "/x"})[0] == 400
    models = {m.id: m for m in client.models.list().data}
    assert models["runtime"].parent == BASE_ID and models[BASE_ID].parent is None
    assert greedy_ids(vllm_url, "Hello there", adapter_id="runtime") != greedy_ids(vllm_url, "Hello there")
    assert call(vllm_url, "/v1/unload_lora_adapter", {"lora_name": "runtime"})[0] == 200
    assert call(vllm_url, "/v1/unload_lora_adapter", {"lora_name": "runtime"})[0] == 404
    assert "runtime" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="runtime", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)


def test_runtime_lora_on_dev_flavor_and_missing_path(dev, lora_adapter_path):
    before = greedy_ids(dev, "Hello there")
    assert call(dev, "/v1/load_lora_adapter", {"lora_name": "second", "lora_path": str(lora_adapter_path)})[0] == 200
    assert greedy_ids(dev, "Hello there", adapter_id="second") == greedy_ids(dev, "Hello there", adapter_id="startup")
    assert call(dev, "/v1/unload_lora_adapter", {"lora_name": "second"})[0] == 200
    assert greedy_ids(dev, "Hello there") == before
    status, _, answer = call(dev, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "/does/not/exist"})
    assert status == 404 and "error" in answer


def test_tgi_flavor_has_no_runtime_lora_and_lists_only_the_base(sim):
    assert call(sim, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/p"})[0] == 404
    assert [m["id"] for m in call(sim, "/v1/models")[2]["data"]] == ["sim/model"]
    answer = openai_client(sim).chat.completions.create(model="whatever", messages=[{"role": "user", "content": "x"}],
                                                         max_tokens=2)
    assert answer.usage.completion_tokens == 2


# --- overload, faults, cancellation -----------------------------------------------------------------------------


def test_overload_answers_429_in_each_protocol(sim):
    call(sim, "/_dev/faults", {"delay_ms": 1500})
    blockers = [threading.Thread(target=call, args=(sim, "/generate", {"inputs": "x"})) for _ in range(2)]
    for thread in blockers:
        thread.start()
    wait_for(lambda: stats(sim)["in_flight"] == 2)
    status, _, answer = call(sim, "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2}})
    assert (status, answer) == (429, {"error": "Model is overloaded", "error_type": "overloaded"})
    status, events = sse_events(sim, "/generate_stream", {"inputs": "x"})
    assert status == 200 and json.loads(events[0]) == {"error": "Model is overloaded", "error_type": "overloaded"}
    with pytest.raises(openai.RateLimitError):
        openai_client(sim).completions.create(model="m", prompt="x", max_tokens=2)
    for thread in blockers:
        thread.join()


def test_injected_status_and_health(sim):
    call(sim, "/_dev/faults", {"status": 503, "count": 2})
    body = {"inputs": "x", "parameters": {"max_new_tokens": 2}}
    assert [call(sim, "/generate", body)[0] for _ in range(3)] == [503, 503, 200]
    call(sim, "/_dev/faults", {"health": False})
    assert call(sim, "/health")[::2] == (503, {"error": "unhealthy", "error_type": "healthcheck"})
    assert call(sim, "/_dev/faults", {"bogus": 1})[0] == 422


def test_die_after_tokens_closes_the_stream(dev):
    call(dev, "/_dev/faults", {"die_after_tokens": 3})
    before = stats(dev)["requests_aborted"]
    received = raw_post(dev, "/generate_stream", {"inputs": "Hello", "parameters": {"max_new_tokens": 20}})
    assert received.startswith(b"HTTP/1.1 200") and received.count(b"data:") == 3
    assert b'"generated_text":null' in received and b'"generated_text":"' not in received
    assert not received.endswith(b"0\r\n\r\n")  # no end of the chunked body: the connection was cut
    wait_for(lambda: stats(dev)["requests_aborted"] == before + 1)


def test_client_disconnect_stops_the_generation_and_is_counted(dev):
    call(dev, "/_dev/faults", {"token_delay_ms": 20})
    before = stats(dev)
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 500}}
    connection, response = open_stream(dev, "/generate_stream", body)
    received = 0
    while received < 2:
        received += response.readline().startswith(b"data:")
    connection.close()
    wait_for(lambda: stats(dev)["requests_cancelled"] == before["requests_cancelled"] + 1)
    after = stats(dev)
    assert after["in_flight"] == 0
    generated = after["generated_tokens"] - before["generated_tokens"]
    time.sleep(0.2)
    assert stats(dev)["generated_tokens"] - before["generated_tokens"] == generated < 100  # it stopped


# --- simulated mode ---------------------------------------------------------------------------------------------

_SIMULATED = """
import json, sys, urllib.request
from devbackend import BackendConfig, run_in_thread
url, stop = run_in_thread(BackendConfig(simulate=True, sim_output_tokens=7, sim_tokens_per_second=2000))
request = urllib.request.Request(url + "/generate_stream", data=json.dumps({"inputs": "one two three four"}).encode())
events = [json.loads(line[5:]) for line in urllib.request.urlopen(request) if line.startswith(b"data:")]
stop()
print(json.dumps({"torch": "torch" in sys.modules, "events": events}))
"""


def test_simulated_mode_streams_the_configured_tokens_without_torch():
    result = subprocess.run([sys.executable, "-c", _SIMULATED], capture_output=True, text=True, timeout=60, check=True)
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["torch"] is False
    events = answer["events"]
    assert len(events) == 7 and [e["index"] for e in events] == list(range(1, 8))
    assert events[-1]["generated_text"] is not None and events[-1]["token"]["special"]  # stopped early: EOS


def test_cli_in_a_subprocess_simulated_vllm_flavor():
    url, stop = run_in_subprocess(["--simulate", "--flavor", "vllm", "--sim-tokens-per-second", "0",
                                   "--model-id", "sim/base"])
    try:
        answer = openai_client(url).completions.create(model="sim/base", prompt="12345678", max_tokens=3)
        assert answer.usage.prompt_tokens == 2 and answer.usage.completion_tokens == 3  # ceil(8 characters / 4)
        with pytest.raises(openai.NotFoundError):
            openai_client(url).completions.create(model="other", prompt="x", max_tokens=3)
    finally:
        stop()


def test_control_tokens_that_do_not_end_a_turn_are_never_generated(tiny_model_path):
    """The random-weight demo model prefers role markers; the engine never emits them, so answers show text."""
    from devbackend.model_engine import ModelEngine
    from devbackend.protocol import Cancellation, GenerationParams

    engine = ModelEngine(BackendConfig(model=str(tiny_model_path)))
    never = set(engine._never.tolist())
    ids = engine.tokenizer.convert_tokens_to_ids
    assert {ids(t) for t in ("<|assistant|>", "<|user|>", "<|pad|>", "<|bos|>")} <= never
    assert not {ids("<|end|>"), engine.tokenizer.eos_token_id} & never  # what ends a trained answer stays
    prompt = engine.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hello, who are you?"}],
                                                                tokenize=False, add_generation_prompt=True))
    for sampling in (False, True):
        tokens = []
        engine._generate(prompt, GenerationParams(max_new_tokens=20, do_sample=sampling, seed=1), None,
                         Cancellation(), tokens.append)
        assert len(tokens) == 20 and not any(isinstance(t, BaseException) for t in tokens)
        assert not never & {t.id for t in tokens}
        assert "".join(t.text for t in tokens if not t.special).strip()  # visible text, not only markers


# --- tool calling (vLLM's --enable-auto-tool-choice, for the tiny model's template) -----------------------------

WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALLED = 'Checking.<|tool_call|>{"name": "get_weather", "arguments": {"city": "Paris"}}<|tool_call|>{"name": "f", "arguments": {}}'


def test_tool_call_parser_like_vllms():
    from devbackend.tools import ToolCallStream, parse_tool_calls

    content, calls = parse_tool_calls(CALLED)
    assert content == "Checking." and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("f", {})]
    assert all(c["id"].startswith("chatcmpl-tool-") and c["type"] == "function" for c in calls)
    assert parse_tool_calls("plain text") == ("plain text", [])
    broken = 'x<|tool_call|>{"name": "f", "argu'
    assert parse_tool_calls(broken) == (broken, [])  # a cut call stays text
    assert parse_tool_calls('<|tool_call|>{"name": "f", "arguments": {}} and more')[1] == []

    stream = ToolCallStream()
    sent = [stream.feed(CALLED[i:i + 3]) for i in range(0, len(CALLED), 3)]
    assert "".join(sent) == "Checking." and not any("<|" in s for s in sent)
    content, items = stream.finish()
    assert content == "" and [i["index"] for i in items] == [0, 0, 1, 1]
    assert items[0]["function"] == {"name": "get_weather"} and json.loads(items[1]["function"]["arguments"]) == {"city": "Paris"}
    partial = ToolCallStream()
    assert partial.feed("a <|tool") == "a " and partial.feed("s") == "<|tools" and partial.finish() == ("", [])


def test_tools_and_tool_messages_go_through_the_chat_template(vllm_url, tiny_model_path):
    from transformers import AutoTokenizer

    from common.chat import template_message

    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    client = openai_client(vllm_url)
    plain = client.chat.completions.create(model=BASE_ID, messages=messages[:1], max_tokens=3, temperature=0)
    answer = client.chat.completions.create(model=BASE_ID, messages=messages, tools=WEATHER, tool_choice="auto",
                                            max_tokens=3, temperature=0)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    rendered = tok.apply_chat_template([template_message(m) for m in messages], tools=WEATHER, tokenize=False,
                                       add_generation_prompt=True)
    assert '<|tools|>[{"type": "function"' in rendered
    assert '<|tool_call|>{"name": "get_weather", "arguments": {"city": "Paris"}}' in rendered and "<|tool|>sunny<|end|>" in rendered
    assert answer.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"]) > plain.usage.prompt_tokens
    assert stats(vllm_url)["last_request"]["body"]["tools"] == WEATHER


@pytest.fixture
def calling_sim(monkeypatch):
    """A simulated vllm-flavor backend whose "model" answers CALLED (the random tiny model never calls by itself)."""
    from devbackend import sim_engine
    from devbackend.protocol import Token

    def tokens(self, params):
        pieces = [CALLED[i:i + 5] for i in range(0, len(CALLED), 5)]
        return [*(Token(100 + i, p, -1.0, False) for i, p in enumerate(pieces)), Token(2, "<|eos|>", -0.1, True, "eos_token")]

    monkeypatch.setattr(sim_engine.SimEngine, "_tokens", tokens)
    yield from _serve(BackendConfig(simulate=True, flavor="vllm", sim_tokens_per_second=2000))


def test_generated_calls_come_back_as_tool_calls_streamed_or_not(calling_sim):
    client = openai_client(calling_sim)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    answer = client.chat.completions.create(model="sim/model", messages=ask, tools=WEATHER, max_tokens=50)
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls" and message.content == "Checking."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [("get_weather", {"city": "Paris"}), ("f", {})]

    chunks = list(client.chat.completions.create(model="sim/model", messages=ask, tools=WEATHER, max_tokens=50, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == "Checking."
    items = [tc for d in deltas for tc in d.tool_calls or []]
    assert [(tc.index, tc.function.name) for tc in items if tc.id] == [(0, "get_weather"), (1, "f")]
    assert json.loads("".join(tc.function.arguments or "" for tc in items if tc.index == 0)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    for stream in (False, True):  # tool_choice "none": the text as it is, never calls
        out = client.chat.completions.create(model="sim/model", messages=ask, tools=WEATHER, tool_choice="none", max_tokens=50, stream=stream)
        if stream:
            out = list(out)
            assert "".join(c.choices[0].delta.content or "" for c in out) == CALLED
            assert not any(c.choices[0].delta.tool_calls for c in out) and out[-1].choices[0].finish_reason == "stop"
        else:
            assert out.choices[0].message.content == CALLED and out.choices[0].message.tool_calls is None
