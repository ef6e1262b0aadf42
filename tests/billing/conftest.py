"""Billing fixtures: a catalogue (base model, pools), prices, ledger rows, and signed Stripe webhooks."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from datetime import date, datetime, timezone as dt_timezone
from decimal import Decimal

import pytest

from billing.models import Price
from serving.models import Adapter, Backend, BackendPool, BaseModel, UsageRecord

WEBHOOK_SECRET = "whsec_test_secret"
_ids = itertools.count(1)


@pytest.fixture(autouse=True)
def _billing_settings(settings):
    settings.STRIPE_SECRET_KEY = ""
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"


class Catalog:
    def __init__(self, world):
        self.base = BaseModel.objects.create(name="tiny-chat", hf_id="tiny/chat")
        self.other_base = BaseModel.objects.create(name="big-chat", hf_id="big/chat")
        self.shared = BackendPool.objects.create(name="shared-tiny", base_model=self.base, kind="dev", gpu_hourly_cost_cents=200)
        self.big = BackendPool.objects.create(name="shared-big", base_model=self.other_base, kind="dev", gpu_hourly_cost_cents=900)
        self.dedicated = BackendPool.objects.create(name="acme-tiny", base_model=self.base, kind="dev", dedicated_tenant=world.tenant, gpu_hourly_cost_cents=300)
        for pool in (self.shared, self.big, self.dedicated):
            Backend.objects.create(pool=pool, url=f"http://{pool.name}.test:8000")
        self.adapter = Adapter.all_tenants.create(tenant=world.tenant, name="ft:tiny-chat:acme:support:1", base_model=self.base, path="/tmp/a")


@pytest.fixture
def catalog(world) -> Catalog:
    return Catalog(world)


def price(base, *, effective_from: date, inp: str, out: str, train: str = "0", adapter=None, pool=None) -> Price:
    return Price.objects.create(base_model=base, adapter=adapter, pool=pool, effective_from=effective_from,
                                input_price=Decimal(inp), output_price=Decimal(out), training_price=Decimal(train))


def usage(tenant, *, at: datetime, model="tiny-chat", adapter="", pool=None, inp=0, out=0, status="ok", duration_ms=100) -> UsageRecord:
    return UsageRecord.all_tenants.create(
        tenant=tenant, request_id=f"req-{next(_ids)}", endpoint="chat", model=model, adapter=adapter, pool=pool,
        input_tokens=inp, output_tokens=out, status=status, duration_ms=duration_ms, created_at=at,
    )


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=dt_timezone.utc)


def sign(body: bytes, *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """Stripe's scheme: t=<unix>,v1=HMAC_SHA256(secret, f"{t}.{body}")."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def invoice_event(event_id: str, kind: str, invoice, *, status: str | None = None, created: int | None = None) -> bytes:
    obj = {"id": invoice.stripe_invoice_id or f"in_{invoice.pk}", "object": "invoice", "status": status or kind.split(".")[-1],
           "metadata": {"invoice_uuid": str(invoice.uuid)}}
    return json.dumps({"id": event_id, "object": "event", "type": kind, "created": created or int(time.time()),
                       "data": {"object": obj}}).encode()


def post_webhook(client, body: bytes, header: str | None = None):
    return client.post("/webhooks/stripe/", data=body, content_type="application/json",
                       HTTP_STRIPE_SIGNATURE=header if header is not None else sign(body))
