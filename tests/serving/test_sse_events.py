"""serving.drivers.base.sse_events: a backend's server-sent events, however the network cuts them, and what a broken
backend sends instead (a BackendError `protocol`). No server: the response is a list of network reads."""

from __future__ import annotations

import asyncio
import json

import pytest

from serving.drivers.base import MAX_EVENT_BYTES, BackendError, sse_events


class Reads:
    """An aiohttp response whose body arrives in these pieces."""

    def __init__(self, pieces: list[bytes]):
        self.content = self
        self.pieces = pieces
        self.read = 0

    async def iter_any(self):
        for piece in self.pieces:
            self.read += 1
            yield piece


def events(pieces: list[bytes]) -> list[dict]:
    async def collect():
        return [e async for e in sse_events(Reads(pieces))]

    return asyncio.run(collect())


STREAM = (b'data: {"n": 1, "text": "\xf0\x9f\x98\x80 \xe4\xbd\xa0\xe5\xa5\xbd"}\n\n'
          b": a comment\n\nevent: message\nid: 7\ndata: {\"n\": 2}\r\n\r\ndata:{\"n\": 3}\n\ndata: [DONE]\n\n")


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(STREAM)])
def test_the_same_events_however_the_body_is_cut(size):
    pieces = [STREAM[i:i + size] for i in range(0, len(STREAM), size)]  # cuts inside lines and inside UTF-8 characters
    got = events(pieces)
    assert [e["n"] for e in got] == [1, 2, 3]
    assert got[0]["text"] == "😀 你好"


def test_it_stops_at_done_without_reading_further():
    reads = Reads([b'data: {"n": 1}\n\ndata: [DONE]\n\n', b'data: {"n": 2}\n\n'])

    async def collect():
        return [e async for e in sse_events(reads)]

    assert [e["n"] for e in asyncio.run(collect())] == [1]
    assert reads.read == 1


def test_a_last_line_without_its_newline_still_counts():
    assert [e["n"] for e in events([b'data: {"n": 1}\n\ndata: {"n": 2}'])] == [1, 2]


@pytest.mark.parametrize("piece", [MAX_EVENT_BYTES // 4, MAX_EVENT_BYTES + 10], ids=["many-reads", "one-read"])
def test_a_line_longer_than_the_limit_is_unreadable(piece):
    line = b'data: {"text": "' + b"x" * (MAX_EVENT_BYTES + 1) + b'"}\n\n'
    with pytest.raises(BackendError, match="a line longer than 512 KiB") as refused:
        events([line[i:i + piece] for i in range(0, len(line), piece)])
    assert refused.value.error_type == "protocol"


def test_a_line_just_inside_the_limit_is_read():
    text = "x" * (MAX_EVENT_BYTES - 100)
    line = b"data: " + json.dumps({"text": text}).encode() + b"\n\n"
    assert events([line[i:i + 4096] for i in range(0, len(line), 4096)]) == [{"text": text}]


@pytest.mark.parametrize("payload,reason", [(b"not json", ""), (b"[1, 2]", "not an object"),
                                            (b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}", "json_too_deep"),
                                            (b'{"text": "a\\ud800"}', "invalid_unicode")])
def test_data_that_is_not_a_json_object_is_unreadable(payload, reason):
    with pytest.raises(BackendError, match="unreadable event") as refused:
        events([b'data: {"n": 1}\n\n', b"data: " + payload + b"\n\n"])
    assert refused.value.error_type == "protocol" and reason in refused.value.message
