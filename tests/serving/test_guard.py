"""The output guard (serving.guard): detectors, streaming equivalence, and end to end through the gateway."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from concurrent.futures import Future

import pytest

from serving.guard import BLOCKED, MAX_HOLD, REDACTED, build_guard, guard_from_config, luhn_ok
from tests.support.gateway import (
    make_base_model,
    make_key,
    make_pool,
    post,
    serve_forever,
    set_model_config,
    stream_lines,
)

EMAILS = build_guard(emails=True)
PHONES = build_guard(phones=True)
CARDS = build_guard(cards=True)
ALL = build_guard(emails=True, phones=True, cards=True, patterns=[r"ACME-\d{3,}", r"(?i)secret:\s*\S+", r"x{3}y"],
                  blocked_terms=["darn", "Bad Word", "c++"])


def stream(guard, chunks):
    r = guard.stream()
    return "".join(r.feed(c) for c in chunks) + r.flush()


def random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(set(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 60))))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


# ---- detectors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["john.doe@example.com", "a_b+tag@mail.co.uk", "X@Y.ORG", "first.last@sub-domain.example.io"])
def test_emails_are_redacted(text):
    assert EMAILS.apply(f"mail {text}, thanks") == f"mail {REDACTED}, thanks"


@pytest.mark.parametrize("text", ["user@localhost", "@handle", "a@b", "not an email", "x@y.z", "foo@@bar.com"])
def test_email_negatives(text):
    assert EMAILS.apply(text) == text


@pytest.mark.parametrize("text", [
    "+1 (555) 123-4567", "+44 20 7946 0958", "+4915112345678", "(555) 123-4567", "555-123-4567", "555.123.4567",
    "555 123 4567", "06 12 34 56 78", "020 7946 0958", "07700 900123", "030 12345678", "555-1234",
])
def test_phone_numbers_are_redacted(text):
    assert PHONES.apply(f"call {text} now") == f"call {REDACTED} now"


@pytest.mark.parametrize("text", [
    "In 2026 we shipped 42 units.", "2026-01-15", "15.01.2026", "01/15/2026", "version 1.2.3", "call 911", "12345",
    "pi is 3.14159265", "+12", "between 1999-2026", "1 2 3 4 5 6 7 8", "order 12345678901234567890",
])
def test_phone_negatives(text):
    assert PHONES.apply(text) == text


@pytest.mark.parametrize("text", ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "378282246310005", "6011 0009 9013 9424"])
def test_card_numbers_are_redacted_when_luhn_passes(text):
    assert CARDS.apply(f"card: {text}.") == f"card: {REDACTED}."


@pytest.mark.parametrize("text", ["4111 1111 1111 1112", "1234567812345678", "4111 1111 111", "12345678901234567890123", "2026"])
def test_card_negatives(text):
    assert CARDS.apply(f"card: {text}.") == f"card: {text}."


def test_luhn():
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")


def test_custom_patterns_and_blocked_terms():
    text = "Ticket ACME-12345 and acme-1, SECRET: hunter2; Darn it, a bad word, darned badwords, C++ code, xxxy."
    assert ALL.apply(text) == (f"Ticket {REDACTED} and acme-1, {REDACTED} {BLOCKED} it, a {BLOCKED}, darned badwords, "
                               f"{BLOCKED} code, {REDACTED}.")


def test_tool_call_arguments_nested_beyond_what_json_loads_can_recurse_are_redacted_as_text():
    """A model's arguments are anything it wrote: 5,000 levels deep was a RecursionError mid-answer."""
    deep = '{"to": "bob@example.com", "x": ' + "[" * 5000 + "]" * 5000 + "}"
    assert EMAILS.apply_json(deep) == deep.replace("bob@example.com", REDACTED)
    assert json.loads(EMAILS.apply_json('{"to": "bob@example.com"}')) == {"to": REDACTED}


def test_nothing_enabled_is_no_guard_and_bad_patterns_are_skipped(caplog):
    assert build_guard() is None
    assert build_guard(patterns=["", None], blocked_terms=["", "  "]) is None
    guard = build_guard(patterns=["([unclosed", "a*", r"ok-\d+"])
    assert guard is not None and [d.name for d in guard.detectors] == ["pattern2"]
    assert guard.apply("ok-1 aaa") == f"{REDACTED} aaa"
    assert "skipped" in caplog.text

    class Cfg:
        redact_emails, redact_phone_numbers, redact_card_numbers, redact_patterns, blocked_terms = False, False, False, [], []

    assert guard_from_config(None) is None and guard_from_config(Cfg()) is None
    Cfg.redact_card_numbers = True
    assert guard_from_config(Cfg()).apply("4111111111111111") == REDACTED


# ---- streaming -----------------------------------------------------------------------------------

SAMPLES = [
    "Mail john.doe@example.com or call +1 (555) 123-4567, card 4111 1111 1111 1111 vs 4111 1111 1111 1112.",
    "In 2026 we had 42 items. ACME-1234 is the secret: hunter2 and a Darn bad word. 555-123-4567 on 2026-01-15.",
    "x@y.co.uk,a@b.io;c@d.fr 020 7946 0958 06 12 34 56 78 07700 900123 darn-darn darndarn BAD WORD bad  word",
    "no candidates at all in this plain sentence, just words and more words.\nAnd a second line!",
    "4111-1111-1111-1111-1111 378282246310005 37828224631000 +4915112345678 (030) 1234 5678 xxxxy xxy c++ C++x",
    "edge: trailing email at the end foo.bar@baz.example",
    "digits 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 and 555-1234 5551234 +44 20",
]


@pytest.mark.parametrize("guard", [EMAILS, PHONES, CARDS, ALL], ids=["emails", "phones", "cards", "all"])
def test_streaming_equals_apply_for_random_chunkings(guard):
    rng = random.Random(20260115)
    for text in SAMPLES:
        expected = guard.apply(text)
        assert stream(guard, [text]) == expected
        assert stream(guard, list(text)) == expected  # one character at a time
        for _ in range(300):
            assert stream(guard, random_chunks(text, rng)) == expected


def test_streaming_equals_apply_on_random_texts():
    rng = random.Random(7)
    atoms = ["john.doe@example.com", "+44 20 7946 0958", "555-123-4567", "4111 1111 1111 1111", "4111 1111 1111 1112",
             "ACME-9999", "secret: s3cr3t", "darn", "bad word", "2026", "2026-01-15", " ", " ", ", ", ".", "\n", "a", "@",
             "-", "1", "12", "x", "xxx", "y", "word", "c++", "(555) 123-4567"]
    for _ in range(400):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(1, 30)))
        expected = ALL.apply(text)
        for _ in range(5):
            assert stream(ALL, random_chunks(text, rng)) == expected, text


def test_safe_text_is_released_early_and_the_hold_is_bounded():
    r = ALL.stream()
    assert r.feed("Hello there, my address is ") == "Hello there, my address is "
    assert r.feed("john") == ""  # could still become an e-mail address
    assert r.feed(".doe@exa") == ""
    assert r.feed("mple.com and more") == f"{REDACTED} and "
    assert r.held == len("more")
    assert r.flush() == "more"

    # A long run that could be a match is cut at MAX_HOLD.
    r = build_guard(patterns=[r"z+!"]).stream()
    out = ""
    for _ in range(1000):
        out += r.feed("z")
        assert r.held <= MAX_HOLD
    out += r.flush()
    assert len(out) == 1000

    # Prose with custom patterns and blocked terms holds at most a few characters.
    r = ALL.stream()
    text = "The quick brown fox jumps over the lazy dog. " * 50
    max_held = 0
    for i in range(0, len(text), 3):
        r.feed(text[i:i + 3])
        max_held = max(max_held, r.held)
    held = r.held
    assert max_held <= 8
    assert r.flush() == (text[-held:] if held else "")


def test_plain_text_passes_unchanged_and_is_not_held():
    # What the guard costs per streamed token is measured by bench/noisy_neighbour.py ("patterns"), not asserted here.
    text = "The quick brown fox jumps over the lazy dog, 42 times in 2026. " * 2000  # ~126k chars
    chunks = [text[i:i + 4] for i in range(0, len(text), 4)]
    r = ALL.stream()
    out, max_held = [], 0
    for c in chunks:
        out.append(r.feed(c))
        max_held = max(max_held, r.held)
    assert "".join(out) + r.flush() == text
    assert max_held <= 8  # released as it comes, never accumulated


def test_tgi_details_tokens_are_redacted():
    tokens = [{"id": 1, "text": "mail ", "special": False}, {"id": 2, "text": "a@b", "special": False},
              {"id": 3, "text": ".com", "special": False}, {"id": 4, "text": "</s>", "special": True}]
    EMAILS.redact_tokens(tokens)
    assert [t["text"] for t in tokens] == ["mail ", "", REDACTED, "</s>"]


# ---- end to end through the gateway ---------------------------------------------------------------


class FakeBackend:
    """A scripted backend: streams `self.chunks` exactly as split, in the dev driver's formats."""

    def __init__(self):
        self.chunks: list[str] = ["hello"]
        self.loop = asyncio.new_event_loop()
        started: Future = Future()
        threading.Thread(target=self._main, args=(started,), daemon=True, name="fake-backend").start()
        self.url = started.result(timeout=10)

    def _main(self, started):
        from aiohttp import web

        async def health(request):
            return web.Response()

        async def chat(request):
            body = await request.json()
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            head = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
            for c in self.chunks:
                await resp.write(b"data: " + json.dumps({**head, "choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}]}).encode() + b"\n\n")
                await asyncio.sleep(0.005)
            await resp.write(b"data: " + json.dumps({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode() + b"\n\n")
            usage = {"prompt_tokens": 5, "completion_tokens": len(self.chunks), "total_tokens": 5 + len(self.chunks)}
            await resp.write(b"data: " + json.dumps({**head, "choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n")
            return resp

        async def generate_stream(request):
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            for i, c in enumerate(self.chunks, 1):
                event = {"index": i, "token": {"id": i, "text": c, "logprob": -0.1, "special": False}, "generated_text": None, "details": None}
                await resp.write(b"data:" + json.dumps(event).encode() + b"\n\n")
                await asyncio.sleep(0.005)
            n = len(self.chunks) + 1
            event = {"index": n, "token": {"id": 2, "text": "</s>", "logprob": 0.0, "special": True}, "generated_text": "".join(self.chunks),
                     "details": {"finish_reason": "eos_token", "generated_tokens": n, "seed": None, "input_length": 5}}
            await resp.write(b"data:" + json.dumps(event).encode() + b"\n\n")
            return resp

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_post("/generate_stream", generate_stream)
        serve_forever(self.loop, app, started)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def fake():
    backend = FakeBackend()
    yield backend
    backend.stop()


SPLIT = ["Contact me at jo", "hn.do", "e@exam", "ple.com", " today, or ", "4111 1111 ", "1111 1111."]
RAW = "".join(SPLIT)


@pytest.fixture
def guarded(world, gateway_factory, fake):
    fake.chunks = SPLIT
    make_pool("shared", make_base_model(), [fake.url])
    set_model_config(world.tenant, redact_emails=True, blocked_terms=["today"])
    keys = {"guarded": make_key(world.tenant)[1], "plain": make_key(world.other_tenant)[1]}
    return gateway_factory(), keys


def _chat(gw, key, *, stream: bool):
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": stream}
    headers = {"authorization": f"Bearer {key}"}
    if not stream:
        r = post(f"{gw.url}/v1/chat/completions", body, headers)
        assert r.status_code == 200, r.text
        return r.json()
    status, lines = stream_lines(f"{gw.url}/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}, headers)
    assert status == 200 and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_e2e_chat_stream_redacts_an_address_split_across_chunks(guarded):
    gw, keys = guarded
    events = _chat(gw, keys["guarded"], stream=True)
    contents = [e["choices"][0]["delta"].get("content") for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    expected = f"Contact me at {REDACTED} {BLOCKED}, or 4111 1111 1111 1111."  # cards are not enabled for this tenant
    assert "".join(contents) == expected
    assert contents[0] == "Contact me at "  # released before the address was complete
    assert not any("@" in c or "exam" in c for c in contents)
    assert events[-1]["usage"]["completion_tokens"] == len(SPLIT)  # the backend's count, untouched


def test_e2e_chat_non_streamed_is_redacted(guarded):
    gw, keys = guarded
    answer = _chat(gw, keys["guarded"], stream=False)
    assert answer["choices"][0]["message"]["content"] == f"Contact me at {REDACTED} {BLOCKED}, or 4111 1111 1111 1111."
    assert answer["usage"]["completion_tokens"] == len(SPLIT)


def test_e2e_tenant_without_a_guard_gets_the_raw_text(guarded):
    gw, keys = guarded
    events = _chat(gw, keys["plain"], stream=True)
    contents = [e["choices"][0]["delta"].get("content") for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert contents == SPLIT
    assert _chat(gw, keys["plain"], stream=False)["choices"][0]["message"]["content"] == RAW


def test_e2e_tgi_stream_and_generate_are_redacted(guarded):
    gw, keys = guarded
    headers = {"authorization": f"Bearer {keys['guarded']}"}
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 20, "details": True}}
    status, lines = stream_lines(f"{gw.url}/generate_stream", body, headers)
    assert status == 200
    events = [json.loads(line[5:]) for line in lines]
    expected = f"Contact me at {REDACTED} {BLOCKED}, or 4111 1111 1111 1111."
    assert len(events) == len(SPLIT) + 1  # one event per backend token, the shape kept
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None for e in events[:-1]) and events[-1]["generated_text"] == expected
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == expected
    assert events[-1]["details"]["generated_tokens"] == len(SPLIT) + 1

    r = post(f"{gw.url}/generate", body, headers)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["generated_text"] == expected
    assert "".join(t["text"] for t in answer["details"]["tokens"] if not t["special"]) == expected


def test_tgi_final_event_carries_the_held_tail():
    from serving.drivers import Finish, TokenDelta
    from serving.gateway.formatting import TGIFormat

    fmt = TGIFormat(details=False, client_prompt="", return_full_text=False)
    assert fmt.delta(TokenDelta("", 1, {"id": 7, "text": "", "logprob": -1.0, "special": False}, last=True)) is None
    event = json.loads(fmt.end(Finish("length"), "x [REDACTED]", 1, 2, tail="[REDACTED]")[5:])
    assert event["token"] == {"id": 7, "text": "[REDACTED]", "logprob": -1.0, "special": False}

    fmt = TGIFormat(details=False, client_prompt="", return_full_text=False)
    fmt.delta(TokenDelta("", 1, {"id": 2, "text": "</s>", "logprob": 0.0, "special": True}, last=True))
    event = json.loads(fmt.end(Finish("stop"), "tail", 1, 2, tail="tail")[5:])
    assert event["token"]["text"] == "tail" and event["token"]["special"] is False and event["generated_text"] == "tail"
    fmt = TGIFormat(details=False, client_prompt="", return_full_text=False)
    fmt.delta(TokenDelta("", 1, {"id": 2, "text": "</s>", "logprob": 0.0, "special": True}, last=True))
    assert json.loads(fmt.end(Finish("stop"), "", 1, 2)[5:])["token"]["text"] == "</s>"  # no guard: unchanged


# ---- tenants' patterns run in linear time --------------------------------------------------------

CATASTROPHIC = r"(?:\S+\s?)+#"  # exponential on a backtracking engine for text without '#'


def test_a_catastrophic_pattern_redacts_in_linear_time():
    # Run in a subprocess with a deadline: on a backtracking engine this text takes longer than the universe's age.
    import subprocess
    import sys

    code = ("from serving.guard import build_guard\n"
            f"g = build_guard(patterns=[{CATASTROPHIC!r}])\n"
            "text = 'word ' * 2000 + 'end'\n"
            "assert g.apply(text) == text\n"
            "r = g.stream(); out = ''.join(r.feed(c) for c in text.split(' ')) + r.flush()\n"
            "assert g.apply('tag a b c#') == '[REDACTED]'\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_tenant_patterns_keep_the_split_chunk_guarantee():
    guard = build_guard(patterns=[CATASTROPHIC, r"ACME-\d{3,}"])
    rng = random.Random(7)
    for text in ["see ACME-1234 and tag#", "nothing to see here", "a#b# c ACME-99 ACME-100 #", "x " * 100 + "#"]:  # candidates within MAX_HOLD
        whole = guard.apply(text)
        for _ in range(20):
            assert stream(guard, random_chunks(text, rng)) == whole


@pytest.mark.parametrize(("pattern", "reason"), [
    (r"(?<=secret)\d+", "lookarounds and backreferences are not supported"),
    (r"(a)\1", "lookarounds and backreferences are not supported"),
    ("a" * 501, "the limit is 500"),
    ("x*", "empty string"),
    ("([unclosed", "missing"),
    (r"(?:(?:\S+\s?){1,30}){1,30}#", "15,303 RE2 instructions; the limit is 500"),
])
def test_unusable_patterns_are_refused_with_the_reason(pattern, reason):
    from serving.guard import custom_pattern_error

    error = custom_pattern_error(pattern)
    assert error is not None and reason in error


def test_a_stored_pattern_re2_cannot_run_is_skipped_not_fatal(caplog):
    guard = build_guard(patterns=[r"(?<=x)y", r"ACME-\d+"])
    assert guard.apply("xy ACME-1") == f"xy {REDACTED}"


# Accepted before the size limits: 45 ms of the shared event loop per streamed token, 270 ms per 2,500 characters.
HUGE_PROGRAM = r"(?:(?:\S+\s?){1,30}){1,30}#"


def test_the_patterns_a_tenant_needs_fit_the_size_limits():
    from serving.guard import custom_pattern_error, patterns_total_error

    needed = [r"ACCT-\d{8}", r"\b[A-Z]{2}\d{2}[A-Z0-9]{11,30}\b", r"sk-[A-Za-z0-9]{20,64}", r"[A-Za-z0-9+/]{40,100}",
              r"(?i)secret[-_ ]?key[:=]\s*\S{8,}", r"(?:\d{1,3}\.){3}\d{1,3}", CATASTROPHIC]
    assert [custom_pattern_error(p) for p in needed] == [None] * len(needed)
    assert patterns_total_error(needed) is None


def test_patterns_too_big_together_are_refused():
    from serving.guard import custom_pattern_error, patterns_total_error

    each = [r"[A-Za-z0-9+/]{40,100}" + c for c in "#@~%&!"]  # 365 instructions each: fine alone
    assert [custom_pattern_error(p) for p in each] == [None] * 6
    error = patterns_total_error(each)
    assert error is not None and "2,190 RE2 instructions; the limit is 2,000" in error


def test_a_stored_pattern_over_the_size_limits_is_skipped(caplog):
    guard = build_guard(patterns=[HUGE_PROGRAM, r"ACME-\d+"], label="acme")
    assert guard.apply("tag a b c# ACME-1") == f"tag a b c# {REDACTED}"
    assert "15,303 RE2 instructions" in caplog.text
    many = build_guard(patterns=[r"[A-Za-z0-9+/]{40,100}" + c for c in "#@~%&!"])
    assert len(many.detectors) == 5  # the sixth would pass the total

