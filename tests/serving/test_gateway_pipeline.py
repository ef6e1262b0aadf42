"""The gateway's pipeline stages, each without a server: the endpoint type, the pure request rewriting, the
accounting object (settle and record exactly once, on every exit path), the response sender and the relays."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

from serving.drivers import BackendError, Finish, TokenDelta, ToolCallDelta
from serving.drivers.base import ContextOverflow
from serving.gateway import endpoints as E
from serving.gateway.errors import ApiError, context_length_exceeded
from serving.gateway.parsing import parse_request
from serving.guard import build_guard
from tests.support.snapshots import snapshot_with_key as _snapshot, tenant_entry as _tenant

CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# ---- the endpoint type ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path, name, protocol, method", [
    ("/v1/chat/completions", "chat", "openai", "POST"), ("/v1/completions", "completions", "openai", "POST"),
    ("/generate", "generate", "tgi", "POST"), ("/generate_stream", "generate_stream", "tgi", "POST"),
    ("/", "generate?", "tgi", "POST"), ("/v1/models", "models", "openai", "GET"), ("/v1/models/ft:x", "model", "openai", "GET"),
    ("/metrics", "metrics", "openai", "GET"),
])
def test_each_path_has_one_endpoint_that_knows_its_protocol(path, name, protocol, method):
    endpoint = E.endpoint_for(path)
    assert (endpoint.name, endpoint.protocol, endpoint.method) == (name, protocol, method)
    assert endpoint.tgi == (protocol == "tgi")
    assert endpoint.inference == (name not in ("models", "model", "metrics"))


def test_an_unknown_path_has_no_endpoint():
    assert E.endpoint_for("/v1/embeddings") is None


def test_tgi_routes_fix_streaming_and_openai_bodies_decide():
    assert (E.GENERATE.stream, E.GENERATE_STREAM.stream, E.CHAT.stream, E.COMPLETIONS.stream) == (False, True, None, None)


@pytest.mark.parametrize("stream, resolved", [(True, E.GENERATE_STREAM), (False, E.GENERATE), (None, E.GENERATE), ("true", E.GENERATE)])
def test_tgi_post_root_is_resolved_by_the_bodys_stream(stream, resolved):
    data = {"inputs": "hi"} if stream is None else {"inputs": "hi", "stream": stream}
    assert E.TGI_COMPAT.resolve(data) is resolved


def test_other_endpoints_resolve_to_themselves():
    for endpoint in (E.CHAT, E.COMPLETIONS, E.GENERATE, E.GENERATE_STREAM):
        assert endpoint.resolve({"stream": True}) is endpoint


def test_errors_are_shaped_by_the_protocol():
    err = ApiError(400, "Bad.", param="model", code="invalid_value")
    assert json.loads(E.CHAT.error_body(err)) == {"error": {"message": "Bad.", "type": "invalid_request_error", "param": "model",
                                                            "code": "invalid_value"}}
    assert json.loads(E.GENERATE.error_body(err)) == {"error": "Bad.", "error_type": "invalid_value"}
    assert E.TGI_COMPAT.error_body(err) == E.GENERATE_STREAM.error_body(err)


def test_in_band_errors_are_shaped_by_the_protocol():
    openai = E.COMPLETIONS.error_event("Cut.", code="backend_interrupted", tgi_type="incomplete_generation")
    tgi = E.GENERATE_STREAM.error_event("Cut.", code="backend_interrupted", tgi_type="incomplete_generation")
    assert json.loads(openai.removeprefix(b"data: ")) == {"error": {"message": "Cut.", "type": "server_error", "param": None,
                                                                     "code": "backend_interrupted"}}
    assert json.loads(tgi.removeprefix(b"data:")) == {"error": "Cut.", "error_type": "incomplete_generation"}


@pytest.mark.parametrize("endpoint, data", [
    (E.CHAT, CHAT_BODY), (E.COMPLETIONS, {"model": "m", "prompt": "hi"}),
    (E.GENERATE, {"inputs": "hi"}), (E.GENERATE_STREAM, {"inputs": "hi"}),
])
def test_parse_request_parses_by_endpoint(endpoint, data):
    req = parse_request(endpoint, data)
    assert req.endpoint is endpoint
    assert req.stream == bool(endpoint.stream)


def test_the_endpoint_names_the_prompt_and_max_tokens_in_context_errors():
    overflow = ContextOverflow(100, 90, 20)
    assert context_length_exceeded(E.CHAT, overflow, 20).param == "messages"
    assert context_length_exceeded(E.COMPLETIONS, overflow, 20).param == "prompt"
    tgi = context_length_exceeded(E.GENERATE_STREAM, overflow, 20)
    assert (tgi.param, tgi.tgi_type) == ("inputs", "validation") and "`max_new_tokens`" in tgi.message
    assert context_length_exceeded("generate", overflow, 20).message == tgi.message  # by its name too
    assert E.GENERATE.max_tokens_param == "parameters.max_new_tokens" and E.CHAT.max_tokens_param == "max_tokens"


# ---- the accounting object: settle and record exactly once --------------------------------------------


class FakeAdmission:
    """Settles as serving.admission does (on_settled once it happened); `gate` holds settles, `defer` keeps them
    waiting for Redis (`redis_answers()`), `fail` makes them raise."""

    def __init__(self, *, gate: asyncio.Event | None = None, defer: bool = False, fail: bool = False):
        self.gate, self.defer, self.fail = gate, defer, fail
        self.settles: list[tuple[str, int]] = []
        self.done: set[str] = set()
        self.deferred: list = []

    async def settle(self, reservation, *, used_tokens: int) -> None:
        self.settles.append((reservation.request_id, used_tokens))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("a bug in settle")
        if self.defer:
            self.deferred.append(reservation)
            return
        self.done.add(reservation.request_id)
        reservation.on_settled()

    def redis_answers(self) -> None:
        for reservation in self.deferred:
            self.done.add(reservation.request_id)
            reservation.on_settled()


class FakeLedger:
    """Records entries, noting whether each one's settle had happened by then."""

    def __init__(self, admission: FakeAdmission, *, durable: bool = True):
        self.admission, self.durable = admission, durable
        self.entries: list = []
        self.after_settle: list[bool] = []

    async def record(self, entry) -> bool:
        await asyncio.sleep(0)
        self.entries.append(entry)
        self.after_settle.append(entry.request_id in self.admission.done or bool(self.admission.fail))
        return self.durable


def _accounting(*, journal=None, reservation=True, durable=True, **admission_options):
    """(an Accounting as the gateway makes one, its fake admission, its fake ledger)."""
    from serving.admission import Reservation
    from serving.gateway.accounting import Accounting

    admission = FakeAdmission(**admission_options)
    ledger = FakeLedger(admission, durable=durable)
    acct = Accounting(request_id="r1", endpoint=E.CHAT, tenant=SimpleNamespace(id=7, slug="t"), key_id=5, model="m",
                      adapter="", pool=SimpleNamespace(id=3), started_at=time.perf_counter(), prompt_estimate=40,
                      reservation=Reservation(7, "r1", 140, "202601", 0, "local") if reservation else None,
                      admission=admission, ledger=ledger, background=set())
    if journal is not None:
        acct.open_journal(journal)
    return acct, admission, ledger


@pytest.fixture
def journal(tmp_path):
    from serving.journal import Journal

    j = Journal(tmp_path / "journal")
    yield j
    j.stop()


def _journaled_output(journal, acct) -> int:
    from serving.journal import SLOT, SLOT_SIZE

    return SLOT.unpack_from(journal.mm, acct.journal.index * SLOT_SIZE)[1]


def test_concurrent_settles_are_one_settle_that_every_caller_waits_for():
    async def run():
        gate = asyncio.Event()
        acct, admission, _ = _accounting(gate=gate)
        acct.first_token()
        acct.deliver(9)
        callers = [asyncio.ensure_future(acct.settle_once()) for _ in range(20)]
        await asyncio.sleep(0.01)
        assert admission.settles == [("r1", 40 + 9)] and not any(c.done() for c in callers)
        gate.set()
        await asyncio.gather(*callers)
        await acct.settle_once()
        assert admission.settles == [("r1", 49)]

    asyncio.run(run())


def test_a_caller_cancelled_while_it_waits_does_not_cancel_the_settle():
    async def run():
        gate = asyncio.Event()
        acct, admission, _ = _accounting(gate=gate)
        first = asyncio.ensure_future(acct.settle_once())
        await asyncio.sleep(0.01)
        first.cancel()
        gate.set()
        await acct.settle_once()
        assert first.cancelled() and admission.done == {"r1"} and len(admission.settles) == 1

    asyncio.run(run())


def test_one_ledger_record_however_many_ask_and_it_waits_for_the_settle():
    async def run():
        gate = asyncio.Event()
        acct, admission, ledger = _accounting(gate=gate)
        writes = [acct.record_once() for _ in range(5)]
        assert writes[0] is not None and writes[1:] == [None] * 4
        await asyncio.sleep(0.01)
        assert ledger.entries == []  # the settle has not happened: no record yet
        gate.set()
        await writes[0]
        assert len(ledger.entries) == 1 and ledger.after_settle == [True]

    asyncio.run(run())


def test_a_completed_request_is_settled_and_durable_when_complete_returns(journal):
    async def run():
        acct, admission, ledger = _accounting(journal=journal)
        acct.first_token()
        acct.deliver(3)
        await acct.complete(Finish("stop", prompt_tokens=38, completion_tokens=4), delivered=3)
        assert acct.completed and len(ledger.entries) == 1 and ledger.after_settle == [True]
        entry = ledger.entries[0]
        assert (entry.status, entry.input_tokens, entry.output_tokens, entry.endpoint) == ("ok", 38, 4, "chat")
        assert admission.settles == [("r1", 42)]
        assert journal.in_flight == 0  # recorded and settled: out of the journal
        await acct.close()
        assert len(ledger.entries) == 1 and len(admission.settles) == 1

    asyncio.run(run())


def test_a_finish_without_counts_bills_the_estimate_and_what_was_delivered():
    async def run():
        acct, admission, ledger = _accounting()
        await acct.complete(Finish("length"), delivered=6)
        assert (ledger.entries[0].input_tokens, ledger.entries[0].output_tokens) == (40, 6)

    asyncio.run(run())


def test_a_backend_that_refuses_before_its_first_token_charges_nothing(journal):
    async def run():
        acct, admission, ledger = _accounting(journal=journal)
        acct.first_token()  # it had started, then refused (a 5xx with nothing sent)
        acct.refund()
        await acct.settle_once()  # before the error's last byte
        await acct.record_once()
        await acct.close()
        entry = ledger.entries[0]
        assert (entry.status, entry.input_tokens, entry.output_tokens) == ("error", 0, 0)
        assert admission.settles == [("r1", 0)] and journal.in_flight == 0

    asyncio.run(run())


def test_a_stream_cut_mid_answer_is_recorded_interrupted_with_what_was_delivered(journal):
    async def run():
        acct, admission, ledger = _accounting(journal=journal)
        acct.first_token()
        acct.deliver(5)
        assert _journaled_output(journal, acct) == 5  # counted before the chunk goes out
        acct.interrupt()
        await acct.settle_once()  # before the in-band error
        await acct.close()
        await asyncio.sleep(0.01)
        entry = ledger.entries[0]
        assert (entry.status, entry.input_tokens, entry.output_tokens) == ("interrupted", 40, 5)
        assert admission.settles == [("r1", 45)] and ledger.after_settle == [True] and journal.in_flight == 0

    asyncio.run(run())


def test_a_client_that_hangs_up_is_recorded_cancelled_and_settled_at_close(journal):
    async def run():
        acct, admission, ledger = _accounting(journal=journal)
        acct.first_token()
        acct.deliver(2)
        acct.cancel()
        write = acct.record_once()  # in a task of its own: the request's task is being cancelled
        await acct.close()
        await write
        assert [(e.status, e.output_tokens) for e in ledger.entries] == [("cancelled", 2)]
        assert admission.settles == [("r1", 42)] and journal.in_flight == 0

    asyncio.run(run())


def test_a_request_that_never_ran_is_settled_with_nothing_and_leaves_no_record(journal):
    async def run():
        acct, admission, ledger = _accounting(journal=journal)
        assert journal.in_flight == 1
        await acct.close()  # a queue timeout, an unexpected failure before a slot
        assert admission.settles == [("r1", 0)] and ledger.entries == [] and journal.in_flight == 0

    asyncio.run(run())


def test_a_settle_that_fails_still_lets_the_record_be_written(caplog):
    async def run():
        acct, admission, ledger = _accounting(fail=True)
        await acct.complete(Finish("stop", 1, 1), delivered=1)
        assert len(ledger.entries) == 1

    asyncio.run(run())
    assert "settling failed" in caplog.text


def test_a_settle_waiting_for_redis_keeps_the_request_in_the_journal_until_it_happens(journal):
    async def run():
        acct, admission, ledger = _accounting(defer=True, journal=journal)
        await acct.complete(Finish("stop", 10, 2), delivered=2)
        assert len(ledger.entries) == 1 and acct.reservation.committed_ms > 0  # the settle still waiting learns it
        assert journal.in_flight == 1
        admission.redis_answers()
        assert journal.in_flight == 0

    asyncio.run(run())


def test_a_record_the_ledger_could_not_make_durable_keeps_the_request_in_the_journal(journal):
    async def run():
        acct, admission, ledger = _accounting(durable=False, journal=journal)
        await acct.complete(Finish("stop", 10, 2), delivered=2)
        await acct.close()
        assert journal.in_flight == 1  # for a recovery to record

    asyncio.run(run())


def test_without_a_reservation_the_settle_only_releases_the_journal(journal):
    async def run():
        acct, admission, ledger = _accounting(journal=journal, reservation=False)
        await acct.complete(Finish("stop", 10, 2), delivered=2)
        assert admission.settles == [] and len(ledger.entries) == 1 and journal.in_flight == 0

    asyncio.run(run())


def test_the_journal_line_has_what_a_recovery_needs(journal):
    acct, _, _ = _accounting()
    line = acct.journal_line()
    assert {k: line[k] for k in ("id", "t", "k", "e", "m", "a", "p", "pe", "r")} == {
        "id": "r1", "t": 7, "k": 5, "e": "chat", "m": "m", "a": "", "p": 3, "pe": 40, "r": [140, "202601", 0, "local", ""]}


# ---- the response: started once, settled before the last byte ------------------------------------------


class Sent(list):
    """An ASGI `send` that keeps the messages (and, with `ledger`, how many records existed at each one)."""

    def __init__(self, ledger=None):
        super().__init__()
        self.ledger = ledger
        self.records_at: list[int] = []
        self.acct = None  # with one: the tokens it had counted as delivered at each message
        self.counted_at: list[int] = []

    async def __call__(self, message) -> None:
        self.append(message)
        self.records_at.append(len(self.ledger.entries) if self.ledger is not None else 0)
        self.counted_at.append(self.acct.output_tokens if self.acct is not None else 0)

    def starts(self) -> list[dict]:
        return [m for m in self if m["type"] == "http.response.start"]

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self if m["type"] == "http.response.body")


def test_a_stream_starts_once_with_the_requests_headers_and_its_status_is_known():
    from serving.gateway.response import Response

    async def run():
        sent = Sent()
        out = Response(sent, E.CHAT)
        out.headers = {"x-request-id": "abc", "x-ratelimit-limit-requests": 10}
        assert not out.started
        await out.chunk(b"data: 1\n\n")
        await out.chunk(b"data: 2\n\n")
        await out.end(b"data: [DONE]\n\n")
        assert out.started and out.status == 200
        (start,) = sent.starts()
        assert (b"content-type", b"text/event-stream") in start["headers"]
        assert (b"x-request-id", b"abc") in start["headers"] and (b"x-ratelimit-limit-requests", b"10") in start["headers"]
        assert [m.get("more_body") for m in sent[1:]] == [True, True, False]

    asyncio.run(run())


def test_an_error_is_shaped_by_the_endpoint_and_carries_its_own_headers():
    from serving.gateway.response import Response

    async def run():
        sent = Sent()
        out = Response(sent, E.GENERATE)
        out.headers = {"x-request-id": "abc"}
        await out.error(ApiError(429, "Slow down.", code="queue_timeout", headers={"retry-after": "5"}))
        (start,) = sent.starts()
        assert start["status"] == 429 and out.status == 429
        assert {(b"x-request-id", b"abc"), (b"retry-after", b"5"), (b"content-type", b"application/json")} <= set(start["headers"])
        assert json.loads(sent.body()) == {"error": "Slow down.", "error_type": "queue_timeout"}

    asyncio.run(run())


@pytest.mark.parametrize("last", ["json", "end", "stream_error"])
def test_the_settle_runs_before_the_last_byte_whatever_it_is(last):
    from serving.gateway.response import Response

    async def run():
        sent = Sent()
        out = Response(sent, E.CHAT)
        seen = []

        async def settle():
            seen.append(len(sent))

        out.settle_before_end(settle)
        if last == "json":
            await out.json(200, b"{}")
        elif last == "end":
            await out.chunk(b"a")
            await out.end(b"b")
        else:
            await out.chunk(b"a")
            await out.stream_error("Cut.", code="backend_interrupted", tgi_type="incomplete_generation")
        assert seen == [len(sent) - 1]  # just before the last message, not before the others

    asyncio.run(run())


def test_an_unexpected_failure_is_a_bare_500_before_the_start_and_in_band_after():
    from serving.gateway.response import Response

    err = ApiError(500, "The gateway failed.", type="server_error", code="internal_error")

    async def run():
        sent = Sent()
        out = Response(sent, E.CHAT)
        out.headers = {"x-request-id": "abc"}
        await out.fail(err)
        assert sent.starts()[0]["status"] == 500 and sent.starts()[0]["headers"] == [(b"content-type", b"application/json")]
        assert json.loads(sent.body())["error"]["code"] == "internal_error"

        sent = Sent()
        out = Response(sent, E.GENERATE_STREAM)
        await out.chunk(b"data:{}\n\n")
        await out.fail(err)
        assert len(sent.starts()) == 1 and json.loads(sent[-1]["body"].removeprefix(b"data:")) == {
            "error": "The gateway failed.", "error_type": "internal_error"}

    asyncio.run(run())


# ---- the relays: one per protocol and mode, the guard and tool calls as steps ---------------------------


def _relay_world(endpoint, *, guard=None, stream=True, **req_fields):
    """A relay as the gateway builds one: a real Accounting (fake admission and ledger) and a Response on a list."""
    from serving.gateway.accounting import Accounting
    from serving.gateway.parsing import ClientRequest
    from serving.gateway.relays import relay_for
    from serving.gateway.response import Response

    admission = FakeAdmission()
    ledger = FakeLedger(admission)
    acct = Accounting(request_id="rid~1", endpoint=endpoint, tenant=SimpleNamespace(id=7, slug="t", guard=guard), key_id=5,
                      model="m", adapter="", pool=SimpleNamespace(id=3), started_at=time.perf_counter(), prompt_estimate=40,
                      reservation=None, admission=admission, ledger=ledger, background=set())
    sent = Sent(ledger)
    sent.acct = acct
    out = Response(sent, endpoint)
    out.settle_before_end(acct.settle_once)
    req = ClientRequest(endpoint, "m", stream=stream, prompt=req_fields.pop("prompt", "hi"), **req_fields)
    return relay_for(acct, req, out), acct, ledger, sent


async def _events(*events):
    for event in events:
        yield event


def _sse(sent) -> list[dict]:
    return [json.loads(line.split(b":", 1)[1]) for m in sent if m["type"] == "http.response.body"
            for line in m["body"].split(b"\n\n") if line.startswith(b"data:") and line != b"data: [DONE]"]


def test_relay_for_picks_one_relay_per_protocol_and_mode():
    from serving.gateway import relays as R

    guard = build_guard(emails=True)
    for endpoint, stream, kind in [(E.CHAT, True, R.OpenAIStream), (E.CHAT, False, R.OpenAIJson), (E.COMPLETIONS, True, R.OpenAIStream),
                                   (E.GENERATE_STREAM, True, R.TGIStream), (E.GENERATE, False, R.TGIJson)]:
        relay = _relay_world(endpoint, stream=stream)[0]
        assert type(relay) is kind and type(relay.text) is R.Text
        assert type(_relay_world(endpoint, stream=stream, guard=guard)[0].text) is R.GuardedText


def test_openai_stream_counts_each_chunk_before_it_goes_out_and_records_before_the_end():
    async def run():
        relay, acct, ledger, sent = _relay_world(E.CHAT, include_usage=True)
        await relay.run(_events(TokenDelta("Hel"), TokenDelta("lo"), Finish("stop", prompt_tokens=12, completion_tokens=2)))
        chunks = _sse(sent)
        assert [c["choices"][0]["delta"].get("content") for c in chunks[:3]] == ["Hel", "lo", None]
        assert chunks[-1]["usage"] == {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
        assert sent[-1]["body"].endswith(b"data: [DONE]\n\n") and sent[-1]["more_body"] is False
        assert sent.records_at[-1] == 1 and sent.records_at[1] == 0  # durable before the last byte, not before the first
        assert (ledger.entries[0].status, ledger.entries[0].output_tokens, acct.ttft_ms is not None) == ("ok", 2, True)

    asyncio.run(run())


def test_openai_stream_with_a_guard_holds_a_split_address_and_counts_its_tokens_with_the_next_chunk():
    async def run():
        relay, acct, ledger, sent = _relay_world(E.CHAT, guard=build_guard(emails=True))
        events = [TokenDelta("mail bob"), TokenDelta("@example"), TokenDelta(".com now"), TokenDelta(" ok")]
        await relay.run(_events(*events, Finish("stop", 9, 4)))
        texts = [c["choices"][0]["delta"].get("content") for c in _sse(sent)[:-1]]
        assert texts == ["mail ", "[REDACTED] ", "now ", "ok"] and "bob" not in sent.body().decode()
        # "@example" is held: its token counts with the chunk that releases the address (3), not before
        assert sent.counted_at == [1, 1, 3, 4, 4]

    asyncio.run(run())


def test_openai_json_collects_text_and_tool_calls_into_one_body():
    async def run():
        relay, acct, ledger, sent = _relay_world(E.CHAT, stream=False)
        await relay.run(_events(TokenDelta("ok"), ToolCallDelta(0, "f", '{"a":'), ToolCallDelta(0, None, "1}"), Finish("tool_calls", 5, 3)))
        (start,) = sent.starts()
        body = json.loads(sent.body())
        assert start["status"] == 200 and body["choices"][0]["message"]["content"] == "ok"
        (call,) = body["choices"][0]["message"]["tool_calls"]
        assert call["function"] == {"name": "f", "arguments": '{"a":1}'} and call["id"].startswith("call_")
        assert body["usage"]["completion_tokens"] == 3 and sent.records_at[-1] == 1

    asyncio.run(run())


def test_openai_stream_with_a_guard_holds_tool_call_arguments_until_the_call_is_complete():
    async def run():
        relay, acct, ledger, sent = _relay_world(E.CHAT, guard=build_guard(emails=True))
        await relay.run(_events(ToolCallDelta(0, "f", '{"to": "bob@exa'), ToolCallDelta(0, None, 'mple.com"}'), Finish("tool_calls", 5, 2)))
        (call,) = [c["choices"][0]["delta"]["tool_calls"][0] for c in _sse(sent) if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
        assert json.loads(call["function"]["arguments"]) == {"to": "[REDACTED]"}
        assert acct.output_tokens == 2

    asyncio.run(run())


def test_tgi_stream_holds_the_last_token_for_the_final_event():
    async def run():
        relay, acct, ledger, sent = _relay_world(E.GENERATE_STREAM, prompt="Say")
        await relay.run(_events(TokenDelta("a", token={"id": 1, "text": "a", "logprob": -0.5}), TokenDelta("b", last=True),
                                Finish("length", 3, 2)))
        events = _sse(sent)
        assert [e["token"]["text"] for e in events] == ["a", "b"] and [e["generated_text"] for e in events] == [None, "ab"]
        assert events[0]["token"]["id"] == 1 and acct.output_tokens == 2 and sent.records_at[-1] == 1

    asyncio.run(run())


def test_tgi_json_redacts_generated_text_and_the_details_tokens():
    async def run():
        relay, acct, ledger, sent = _relay_world(E.GENERATE, guard=build_guard(emails=True), stream=False, details=True)
        await relay.run(_events(TokenDelta("to bob@", token={"id": 1, "text": "to bob@"}), TokenDelta("x.org", token={"id": 2, "text": "x.org"}),
                                Finish("stop", 3, 2)))
        body = json.loads(sent.body())
        assert body["generated_text"] == "to [REDACTED]"
        assert "".join(t["text"] for t in body["details"]["tokens"]) == "to [REDACTED]"

    asyncio.run(run())


def test_a_stream_that_ends_without_a_result_is_a_backend_error_and_sends_nothing():
    async def run():
        relay, acct, ledger, sent = _relay_world(E.CHAT, stream=False)
        with pytest.raises(BackendError) as failed:
            await relay.run(_events(TokenDelta("a")))
        assert failed.value.error_type == "incomplete_generation" and list(sent) == [] and ledger.entries == []

    asyncio.run(run())


def test_a_tool_call_for_a_text_prompt_is_a_protocol_error():
    async def run():
        relay, *_ = _relay_world(E.GENERATE_STREAM)
        with pytest.raises(BackendError) as failed:
            await relay.run(_events(ToolCallDelta(0, "f", "{}")))
        assert failed.value.error_type == "protocol"

    asyncio.run(run())


# ---- the pure stages: request ids, authentication, route and plan ---------------------------------------


def _pools(adapters=("ad-1",)):
    from serving.config import BackendEntry, PoolEntry

    def pool(pid, kind):
        return PoolEntry(pid, f"p{pid}", kind, "base", "org/base", 4096, 8, None,
                         (BackendEntry(pid * 10, pid, f"http://b{pid}", 8, frozenset(adapters)),))

    return {1: pool(1, "tgi"), 2: pool(2, "vllm")}


def _plan(endpoint, data, **tenant_fields):
    from serving.gateway.plan import plan_request

    return plan_request(parse_request(endpoint, data), _tenant(**tenant_fields), _pools())


def test_request_ids_echo_a_valid_client_id_and_keep_the_ledgers_unique():
    from serving.gateway.plan import request_ids

    first, echoed = request_ids("job-42:a.b")
    second, _ = request_ids("job-42:a.b")
    assert echoed == "job-42:a.b" and first.startswith("job-42:a.b~") and len(first) == len("job-42:a.b") + 13 and first != second
    for given in (None, "", "x" * 49, "has space", "ünïcode"):
        rid, echoed = request_ids(given)
        assert rid == echoed and len(rid) == 24 and int(rid, 16) >= 0


def test_route_for_resolves_names_defaults_and_refuses_the_unknown():
    from serving.gateway.plan import route_for
    from serving.routing import Route

    tenant = _tenant()
    assert route_for(tenant, "ft:mine").adapter == "ad-1"
    with pytest.raises(ApiError) as refused:
        route_for(tenant, None)  # two base models, no default
    assert (refused.value.status, refused.value.code, refused.value.param) == (404, "model_not_found", "model")
    assert route_for(_tenant(default_model="vbase"), "tgi").name == "vbase"
    assert route_for(_tenant(models={"only": Route("only", 1, None, "b", "p", 0)}), "dummy").name == "only"
    with pytest.raises(ApiError) as refused:
        route_for(tenant, "ft:other")
    assert "deployed" in refused.value.message  # the hint for fine-tuned names


def test_the_system_prompt_is_injected_by_the_tenants_rule():
    messages = [{"role": "system", "content": "theirs"}, {"role": "user", "content": "hi"}]
    keep = _plan(E.CHAT, {"model": "base", "messages": messages}, system_prompt="ours")
    assert keep.backend_request.messages == [{"role": "system", "content": "ours\n\ntheirs"}, {"role": "user", "content": "hi"}]
    replace = _plan(E.CHAT, {"model": "base", "messages": messages}, system_prompt="ours", system_message_rule="replace")
    assert replace.backend_request.messages == [{"role": "system", "content": "ours"}, {"role": "user", "content": "hi"}]
    text = _plan(E.COMPLETIONS, {"model": "base", "prompt": "Say", "echo": True}, system_prompt="ours")
    assert text.backend_request.prompt == "ours\n\nSay" and text.req.prompt == "Say"  # echo returns the client's own


def test_sampling_is_explicit_and_clamped_to_the_tenants_maximum():
    hot = _plan(E.CHAT, {"model": "base", "messages": [{"role": "user", "content": "hi"}], "temperature": 2}).backend_request.sampling
    assert (hot.do_sample, hot.temperature) == (True, 1.0)
    greedy = _plan(E.CHAT, {"model": "base", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}).backend_request.sampling
    assert greedy.do_sample is False
    tgi = _plan(E.GENERATE, {"inputs": "hi", "parameters": {"adapter_id": "base"}}).backend_request.sampling
    assert tgi.do_sample is False  # TGI samples only when asked (do_sample, or a temperature)
    assert _plan(E.GENERATE, {"inputs": "hi", "parameters": {"temperature": 0.5}}, default_model="base").backend_request.sampling.do_sample


def test_the_backend_request_is_built_field_by_field():
    chat = _plan(E.CHAT, {"model": "ft:mine", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
                         "cache_salt": "client's", "adapter_source": "x"})
    assert (chat.backend_request.adapter, chat.backend_request.max_tokens, chat.max_tokens) == ("ad-1", 20, 20)
    assert chat.backend_request.cache_salt is None and chat.backend_request.model_id == "org/base"  # a TGI pool: no salt
    vllm = _plan(E.CHAT, {"model": "vbase", "messages": [{"role": "user", "content": "hi"}]})
    assert vllm.backend_request.cache_salt == "salt-7" and vllm.max_tokens == 256  # the tenant's salt; its default max
    assert _plan(E.GENERATE_STREAM, {"inputs": "hi"}, default_model="base").backend_request.want_tokens
    with pytest.raises(ApiError) as refused:
        _plan(E.COMPLETIONS, {"model": "base", "prompt": "hi", "presence_penalty": 1})
    assert refused.value.code == "unsupported_parameter"


def test_max_tokens_above_the_tenants_cap_name_the_endpoints_parameter():
    with pytest.raises(ApiError) as refused:
        _plan(E.GENERATE, {"inputs": "hi", "parameters": {"max_new_tokens": 2000}}, default_model="base")
    assert refused.value.param == "parameters.max_new_tokens"
    with pytest.raises(ApiError) as refused:
        _plan(E.CHAT, {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2000})
    assert refused.value.param == "max_tokens"


def test_an_adapter_on_no_backend_yet_is_a_503_before_admission():
    from serving.gateway.plan import plan_request

    with pytest.raises(ApiError) as refused:
        plan_request(parse_request(E.CHAT, {"model": "ft:mine", "messages": [{"role": "user", "content": "hi"}]}), _tenant(),
                     _pools(adapters=()))
    assert (refused.value.status, refused.value.code, refused.value.headers) == (503, "adapter_not_loaded", {"retry-after": "30"})


def test_fit_refuses_an_exact_prompt_beyond_the_context_and_shortens_a_default_max():
    from serving.tokencount import PromptCount

    asked = _plan(E.CHAT, {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100})
    with pytest.raises(ApiError) as refused:
        asked.fit(PromptCount(4000, exact=True))
    assert refused.value.code == "context_length_exceeded" and "4100 tokens" in refused.value.message
    default = _plan(E.CHAT, {"model": "base", "messages": [{"role": "user", "content": "hi"}]})
    default.fit(PromptCount(4000, exact=True))
    assert default.max_tokens == default.backend_request.max_tokens == 96 and default.reserve_tokens == 4096
    bound = _plan(E.CHAT, {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100})
    bound.fit(PromptCount(4090, exact=False))  # a bound: the backend decides; the reservation is capped at the context
    assert bound.max_tokens == 100 and bound.reserve_tokens == 4096


def test_authenticate_takes_a_valid_key_from_the_snapshot():
    from serving.gateway.auth import authenticate

    snap, raw = _snapshot()
    key, tenant = authenticate(f"Bearer {raw}", snap)
    assert (key.id, tenant.id) == (5, 7)
    assert authenticate(f"bearer   {raw}  ", snap)[0].id == 5


@pytest.mark.parametrize("case, status, code", [
    ("missing", 401, "invalid_api_key"), ("basic", 401, "invalid_api_key"), ("wrong secret", 401, "invalid_api_key"),
    ("not a key", 401, "invalid_api_key"), ("expired", 401, "expired_api_key"), ("no scope", 403, "insufficient_scope"),
    ("suspended", 403, "tenant_suspended"), ("unknown tenant", 401, "invalid_api_key"),
])
def test_authenticate_refuses_with_the_shared_wording(case, status, code):
    from datetime import timedelta

    from django.utils import timezone

    from serving.gateway.auth import authenticate

    key_fields = {"expired": {"expires_at": timezone.now() - timedelta(seconds=1)}, "no scope": {"scopes": frozenset({"files"})},
                  "unknown tenant": {"tenant_id": 8}}.get(case)
    snap, raw = _snapshot(key_fields, **({"active": False, "suspended_reason": "unpaid"} if case == "suspended" else {}))
    header = {"missing": None, "basic": f"Basic {raw}", "wrong secret": f"Bearer {raw[:-1]}x", "not a key": "Bearer sk-123"}.get(case, f"Bearer {raw}")
    with pytest.raises(ApiError) as refused:
        authenticate(header, snap)
    assert (refused.value.status, refused.value.code) == (status, code)


def test_a_playground_token_counts_while_its_user_is_listed(settings):
    from serving.gateway.auth import authenticate
    from tenants.services import playground_token_issue

    token = playground_token_issue(tenant=SimpleNamespace(pk=7), user=SimpleNamespace(pk=3))
    snap, _ = _snapshot(playground_users=frozenset({3}))
    assert authenticate(f"Bearer {token}", snap) == (None, snap.tenants[7])
    gone, _ = _snapshot()
    with pytest.raises(ApiError) as refused:
        authenticate(f"Bearer {token}", gone)
    assert refused.value.message.startswith("The playground session has expired")
