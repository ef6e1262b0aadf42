"""Billing helpers: prices, ledger rows, a random ledger, signed Stripe webhooks and a stateful fake of Stripe's
invoices (what localstripe lacks). The fixtures built from them are in tests/billing/conftest.py."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import random
import time
from datetime import date, datetime, timedelta, timezone as dt_timezone
from decimal import Decimal
from types import SimpleNamespace

import pytest
import stripe

from billing.models import Price
from serving.models import Adapter, Backend, BackendPool, BaseModel, UsageRecord

WEBHOOK_SECRET = "whsec_test_secret"


_ids = itertools.count(1)


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


def _missing(what: str, object_id: str) -> stripe.InvalidRequestError:
    return stripe.InvalidRequestError(f"No such {what}: '{object_id}'", "id", code="resource_missing", http_status=404)


class FakeInvoices:
    """Stripe's `v1.invoices` as the gateway uses it, for what localstripe lacks: one-off invoices, finalize,
    hosted_invoice_url, mark_uncollectible, idempotency keys. Stateful, like Stripe: a repeated key replays the
    first answer. `calls` records every attempt; `applied` each change Stripe really made.
    `fail[method]` lists what the next calls meet: "down" fails before Stripe acts, "lost" after it acted."""

    def __init__(self):
        self.by_key: dict[str, object] = {}
        self.invoices: dict[str, SimpleNamespace] = {}
        self.calls: list[tuple[str, str]] = []
        self.applied: list[tuple[str, str]] = []
        self.fail: dict[str, list[str]] = {}

    def put(self, invoice_id: str, status: str) -> None:
        """An invoice as Stripe holds it (created outside the calls under test)."""
        self.invoices[invoice_id] = SimpleNamespace(id=invoice_id, status=status, hosted_invoice_url=None)

    def _failure(self, method: str, when: str) -> None:
        if self.fail.get(method) and self.fail[method][0] == when:
            self.fail[method].pop(0)
            raise stripe.APIConnectionError(f"Could not connect to Stripe ({method}, test)")

    def _get(self, invoice_id: str) -> SimpleNamespace:
        if invoice_id not in self.invoices:
            raise _missing("invoice", invoice_id)
        return self.invoices[invoice_id]

    def create(self, params=None, options=None):
        key = options["idempotency_key"]
        self.calls.append(("create", key))
        self._failure("create", "down")
        if key not in self.by_key:
            invoice_id = f"in_fake_{len(self.by_key) + 1}"
            self.put(invoice_id, "draft")
            self.by_key[key] = self.invoices[invoice_id]
        return self.by_key[key]

    def finalize_invoice(self, invoice_id, params=None, options=None):
        self.calls.append(("finalize", options["idempotency_key"]))
        invoice = self._get(invoice_id)
        if invoice.status == "draft":
            invoice.status, invoice.hosted_invoice_url = "open", f"https://invoice.stripe.test/{invoice_id}"
        return invoice

    def retrieve(self, invoice_id, params=None, options=None):
        self.calls.append(("retrieve", invoice_id))
        invoice = self._get(invoice_id)
        return SimpleNamespace(to_dict=lambda: {"id": invoice.id, "status": invoice.status})

    def void_invoice(self, invoice_id, params=None, options=None):
        return self._transition("void", invoice_id, options, allowed=("open", "uncollectible"), to="void")

    def mark_uncollectible(self, invoice_id, params=None, options=None):
        return self._transition("mark_uncollectible", invoice_id, options, allowed=("open",), to="uncollectible")

    def _transition(self, method, invoice_id, options, *, allowed, to):
        key = options["idempotency_key"]
        self.calls.append((method, key))
        self._failure(method, "down")
        if key not in self.by_key:
            invoice = self._get(invoice_id)
            if invoice.status not in allowed:
                raise stripe.InvalidRequestError(f"You cannot {method} an invoice that is {invoice.status}.", None, http_status=400)
            invoice.status = to
            self.applied.append((method, invoice_id))
            self.by_key[key] = SimpleNamespace(id=invoice_id, status=to)
        self._failure(method, "lost")
        return self.by_key[key]

    def delete(self, invoice_id, params=None, options=None):
        self.calls.append(("delete", invoice_id))
        if self._get(invoice_id).status != "draft":
            raise stripe.InvalidRequestError("You can only delete draft invoices.", None, http_status=400)
        del self.invoices[invoice_id]
        self.applied.append(("delete", invoice_id))
        return SimpleNamespace(id=invoice_id, deleted=True)


class FakeInvoiceItems:
    """Stripe's `v1.invoice_items.delete`: pending items, gone once deleted (404 afterwards, as at Stripe)."""

    def __init__(self):
        self.pending: set[str] = set()

    def delete(self, item_id, params=None, options=None):
        if item_id not in self.pending:
            raise _missing("invoiceitem", item_id)
        self.pending.remove(item_id)
        return SimpleNamespace(id=item_id, deleted=True)


def random_ledger(world, catalog, seed: int, n: int = 400):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tenant = rng.choice([world.tenant, world.other_tenant])
        model, pool, adapter = rng.choice([
            ("tiny-chat", catalog.shared, ""), ("big-chat", catalog.big, ""), ("tiny-chat", None, ""),
            *([("tiny-chat", catalog.dedicated, ""), ("tiny-chat", catalog.shared, catalog.adapter.name)] if tenant == world.tenant else []),
        ])
        at = utc(2026, 1, 1) + timedelta(seconds=rng.randrange(31 * 86400))
        status = rng.choice(["ok"] * 6 + ["error", "cancelled", "interrupted"])
        rows.append(usage(tenant, at=at, model=model, adapter=adapter, pool=pool, inp=rng.randrange(0, 5000), out=rng.randrange(0, 3000), status=status))
    # Edges of the period: the first and the last microsecond belong to January, the next instant does not.
    rows.append(usage(world.tenant, at=utc(2026, 1, 1), pool=catalog.shared, inp=7, out=3))
    rows.append(usage(world.tenant, at=utc(2026, 1, 31, 23, 59, 59, 999999), pool=catalog.shared, inp=11, out=13))
    usage(world.tenant, at=utc(2026, 2, 1), pool=catalog.shared, inp=1_000_000, out=1_000_000)
    return rows


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
