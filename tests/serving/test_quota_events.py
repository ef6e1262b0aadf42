"""The 80 % quota warning, recorded from a gateway thread (serving.quota_events)."""

from __future__ import annotations

import pytest
from django.core import mail
from django.db import OperationalError

from serving import quota_events
from tenants.models import AuditEvent


def test_the_warning_is_audited_and_mailed_to_owners_and_admins(world):
    # What quota_warning_record does on its gateway thread (called here without the connection handling, which
    # would close this test's own connection inside its transaction).
    quota_events._record(tenant_id=world.tenant.pk, used_tokens=800, quota_tokens=1000, window="month", mode="hard")
    event = AuditEvent.objects.for_tenant(world.tenant).get(action="quota.warning")
    assert event.data["percent"] == 80
    [message] = mail.outbox
    assert "80 %" in message.subject and "800 of its 1,000 tokens" in message.body and world.owner.email in message.to


def test_a_connection_the_database_dropped_is_closed_even_when_the_warning_fails(monkeypatch):
    """Outside a web request nothing else closes a broken connection: the thread would fail every later warning."""
    calls = []
    monkeypatch.setattr(quota_events, "close_old_connections", lambda: calls.append("close"))

    def dropped(**_):
        calls.append("query")
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(quota_events, "_record", dropped)
    with pytest.raises(OperationalError):
        quota_events.quota_warning_record(tenant_id=1, used_tokens=8, quota_tokens=10, window="month", mode="soft")
    assert calls == ["close", "query", "close"]
