"""The ledger's insert (serving.ledger.flush_batch): one prepared INSERT … ON CONFLICT (request_id) DO NOTHING, on
SQLite and PostgreSQL alike. Every field written as given, a duplicate request id skipped, a bad batch all refused."""

from __future__ import annotations

from datetime import datetime, timezone as dt_timezone

import pytest
from django.db import IntegrityError, transaction

from serving import ledger
from serving.ledger import LedgerEntry, flush_batch
from serving.models import UsageRecord
from tests.support.gateway import make_base_model, make_key, make_pool


def entry(tenant_id: int, request_id: str, **fields) -> LedgerEntry:
    values = dict(api_key_id=None, endpoint="chat", model="m", adapter="", pool_id=None, backend_id=None, input_tokens=10,
                  output_tokens=5, status="ok", ttft_ms=1, duration_ms=2)
    return LedgerEntry(request_id=request_id, tenant_id=tenant_id, **{**values, **fields})


def test_every_field_is_written_as_given(world):
    pool = make_pool("shared", make_base_model(), ["http://127.0.0.1:9"])
    backend = pool.backends.get()
    key, _ = make_key(world.tenant)
    at = datetime(2026, 12, 1, 23, 59, 59, 123456, tzinfo=dt_timezone.utc)
    flush_batch([entry(world.tenant.id, "req-full", api_key_id=key.id, endpoint="generate_stream", model="acme-support",
                       adapter="acme-lora-v2", pool_id=pool.id, backend_id=backend.id, input_tokens=1452, output_tokens=337,
                       status="interrupted", ttft_ms=None, duration_ms=9001, created_at=at),
                 entry(world.tenant.id, "req-clamped", adapter=None, input_tokens=-3, output_tokens=-1, duration_ms=-5)])
    row = UsageRecord.objects.for_tenant(world.tenant).get(request_id="req-full")
    assert (row.api_key_id, row.endpoint, row.model, row.adapter, row.pool_id, row.backend_id) == (
        key.id, "generate_stream", "acme-support", "acme-lora-v2", pool.id, backend.id)
    assert (row.input_tokens, row.output_tokens, row.status, row.ttft_ms, row.duration_ms) == (1452, 337, "interrupted", None, 9001)
    assert row.created_at == at  # the request's own time, to the microsecond, in UTC (a replay bills the request's day)
    clamped = UsageRecord.objects.for_tenant(world.tenant).get(request_id="req-clamped")
    assert (clamped.adapter, clamped.input_tokens, clamped.output_tokens, clamped.duration_ms) == ("", 0, 0, 0)
    assert clamped.created_at.tzinfo is not None and abs((datetime.now(dt_timezone.utc) - clamped.created_at).total_seconds()) < 60


def test_a_batch_of_many_tenants_skips_only_the_duplicate_request_ids(world):
    flush_batch([entry(world.tenant.id, "req-1")])
    written = flush_batch([entry(world.tenant.id, "req-1", input_tokens=999), entry(world.tenant.id, "req-2"),
                           entry(world.other_tenant.id, "req-3"), entry(world.other_tenant.id, "req-3", input_tokens=999)])
    assert written == 4  # what was offered; the table holds each request once
    assert sorted(UsageRecord.objects.for_tenant(world.tenant).values_list("request_id", "input_tokens")) == [
        ("req-1", 10), ("req-2", 10)]  # the first record of a request is the one kept
    assert list(UsageRecord.objects.for_tenant(world.other_tenant).values_list("request_id", "input_tokens")) == [("req-3", 10)]


def test_a_row_that_breaks_another_constraint_refuses_its_whole_batch(world):
    """Only a duplicate request id is skipped (never SQLite's INSERT OR IGNORE, which would drop any bad row silently):
    a record without its endpoint fails the batch, and none of it is half-written. (A record of a tenant that does not
    exist fails at the commit: the foreign keys are checked there, outside this test's transaction.)"""
    with pytest.raises(IntegrityError):
        with transaction.atomic():  # the test's own transaction survives the refusal
            flush_batch([entry(world.tenant.id, "req-good"), entry(world.tenant.id, "req-bad", endpoint=None)])
    assert not UsageRecord.all_tenants.filter(request_id__in=["req-good", "req-bad"]).exists()


def test_the_statement_is_not_built_when_the_model_has_a_field_it_does_not_write(db, monkeypatch):
    monkeypatch.setattr(ledger, "_COLUMNS", tuple(c for c in ledger._COLUMNS if c != "ttft_ms"))
    monkeypatch.setattr(ledger, "_insert_sql", {})
    with pytest.raises(RuntimeError, match="ttft_ms"):
        ledger._insert_statement()
