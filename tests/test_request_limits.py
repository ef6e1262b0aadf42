"""Request bodies are bounded per path before Django (or authentication) reads them (portal.security.limit_body)."""

from __future__ import annotations

import asyncio
import json

import pytest

from portal import asgi
from portal.security import WEBHOOK_MAX_BYTES, body_limit

CHUNK = 64 * 1024


def _call(path: str, *, content_length: int | None, chunks: int, headers=(), hang: bool = False) -> tuple[int, dict, int]:
    """Send `chunks` chunks of CHUNK bytes; returns (status, JSON body, chunks the app read)."""
    sent, read = [], [0]

    async def receive():
        if read[0] >= chunks:
            await asyncio.Event().wait()
        read[0] += 1
        return {"type": "http.request", "body": b"x" * CHUNK, "more_body": read[0] < chunks or hang}

    async def send(message):
        sent.append(message)

    raw = [(b"host", b"127.0.0.1"), (b"content-type", b"application/octet-stream"), *headers]
    if content_length is not None:
        raw.append((b"content-length", str(content_length).encode()))
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": raw, "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5555), "scheme": "http",
             "asgi": {"version": "3.0"}, "http_version": "1.1", "root_path": ""}
    asyncio.run(asyncio.wait_for(asgi.application(scope, receive, send), 30))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body) if sent[0]["status"] in (408, 413) else {}, read[0]


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/v1/files", "/webhooks/stripe/", "/t/acme/finetune/files/upload/", "/accounts/login/"])
def test_a_declared_length_over_the_limit_is_refused_before_reading_a_byte(path):
    status, body, read = _call(path, content_length=10**9, chunks=10**9 // CHUNK)
    assert status == 413 and read == 0
    assert body["error"]["code"] == "request_too_large" and f"{body_limit(path):,} bytes" in body["error"]["message"]


@pytest.mark.django_db
@pytest.mark.parametrize("chunked", [False, True])
def test_a_streamed_body_is_cut_off_once_it_passes_the_limit(chunked):
    # No Content-Length: the webhook limit is 1 MiB; the app stops reading right after it.
    headers = [(b"transfer-encoding", b"chunked")] if chunked else []
    status, body, read = _call("/webhooks/stripe/", content_length=None, chunks=10**9 // CHUNK, headers=headers)
    assert status == 413 and read == WEBHOOK_MAX_BYTES // CHUNK + 1


@pytest.mark.django_db
def test_a_body_within_the_limit_reaches_django():
    status, _, read = _call("/webhooks/stripe/", content_length=CHUNK, chunks=1)
    assert status == 400 and read == 1  # the webhook view answered (no signature), not the limit


def test_uploads_get_the_training_file_limit(settings):
    assert body_limit("/v1/files") > settings.FINETUNE_MAX_UPLOAD_BYTES
    assert body_limit("/v1/files/file-abc/content") < settings.FINETUNE_MAX_UPLOAD_BYTES
    assert body_limit("/admin/") < settings.FINETUNE_MAX_UPLOAD_BYTES


@pytest.mark.django_db(transaction=True)
def test_a_chunked_upload_is_read_whole_not_answered_file_is_required(world, settings, tmp_path):
    # Django takes a body without Content-Length as empty: a chunked upload was answered "file is required".
    from tenants import services
    from tenants.services import Actor

    settings.STORAGE_DIR = tmp_path / "storage"
    _, secret = services.api_key_create(tenant=world.tenant, name="ft", scopes=["finetune"], actor=Actor(user=world.owner))
    line = b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy!"}]}\n'
    boundary = b"----chunked-upload"
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + line * 12 + b"\r\n--" + boundary + b"--\r\n")
    pieces = [body[i:i + 100] for i in range(0, len(body), 100)]
    sent, at = [], [0]

    async def receive():
        if at[0] >= len(pieces):
            await asyncio.Event().wait()
        at[0] += 1
        return {"type": "http.request", "body": pieces[at[0] - 1], "more_body": at[0] < len(pieces)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/files", "raw_path": b"/v1/files", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {secret}".encode()),
                         (b"content-type", b"multipart/form-data; boundary=" + boundary), (b"transfer-encoding", b"chunked")],
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5555), "scheme": "http", "asgi": {"version": "3.0"},
             "http_version": "1.1", "root_path": ""}
    asyncio.run(asyncio.wait_for(asgi.application(scope, receive, send), 60))
    answer = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert sent[0]["status"] == 200, answer
    assert answer["object"] == "file" and answer["bytes"] == len(line) * 12


@pytest.mark.django_db
@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_that_stops_arriving_is_a_408(monkeypatch, chunked):
    # A client that sends part of a body and then nothing held a worker's connection (and Django's read) forever.
    from portal import security

    monkeypatch.setattr(security, "BODY_IDLE_TIMEOUT_S", 0.2)
    headers = [(b"transfer-encoding", b"chunked")] if chunked else []
    status, body, read = _call("/webhooks/stripe/", content_length=None if chunked else 10 * CHUNK, chunks=3, headers=headers, hang=True)
    assert status == 408 and read == 3
