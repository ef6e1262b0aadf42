"""The Stripe gateway against localstripe (a fake Stripe server, test tool only).

Exercised for real at localstripe: customers, invoice items (with our idempotency keys; localstripe
ignores them, so "nothing new on a second push" is proved by our stored ids), the Customer Portal's
absence, and a really signed webhook (customer.created) delivered to our endpoint.
Faked (localstripe lacks them): invoice create without a subscription, finalize, hosted_invoice_url.
The fake honours idempotency keys as Stripe does. Payment is a signed `invoice.paid` event. A void of a push
that stopped half-way deletes its pending invoice items at localstripe for real.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from datetime import date
from types import SimpleNamespace
from urllib.error import URLError
from urllib.request import urlopen

import pytest

from billing import invoicing, services, stripe_gateway
from billing.models import BillingAccount, Invoice, InvoiceLine, StripeEvent
from tenants.services import tenant_rename
from tests.support.billing import WEBHOOK_SECRET, FakeInvoices, invoice_event, post_webhook, price, usage, utc

# localstripe binds every interface and pickles to /tmp: bind it to 127.0.0.1 and keep its store in memory.
BOOT = (
    "import sys, localstripe.resources as r; r.Store.dump_to_disk = lambda self: None; "
    "from aiohttp import web; from localstripe.server import app; "
    "web.run_app(app, host='127.0.0.1', port=int(sys.argv[1]), print=None)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def localstripe_url(tmp_path_factory):
    try:
        import localstripe  # noqa: F401
    except ImportError:
        pytest.skip("localstripe is not installed (pip install localstripe: a dev dependency)")
    port = _free_port()
    tmp = tmp_path_factory.mktemp("localstripe")
    proc = subprocess.Popen([sys.executable, "-c", BOOT, str(port)], cwd=tmp, env={"TMPDIR": str(tmp), "PATH": "/usr/bin:/bin"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while True:
        try:
            urlopen(f"{url}/v1/customers", timeout=1)
        except URLError as exc:
            if getattr(exc, "code", None):  # an HTTP answer (401 without a key): it is up
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip(f"localstripe did not start: {proc.stderr.read().decode()[-300:] if proc.stderr else ''}")
            time.sleep(0.1)
        else:
            break
    yield url
    proc.terminate()
    proc.wait(5)


@pytest.fixture
def stripe_env(settings, localstripe_url):
    settings.STRIPE_SECRET_KEY = "sk_test_localstripe"
    settings.STRIPE_API_BASE = localstripe_url
    real = stripe_gateway.client()
    fake = FakeInvoices()
    hybrid = SimpleNamespace(v1=SimpleNamespace(customers=real.v1.customers, invoice_items=real.v1.invoice_items,
                                                invoices=fake, billing_portal=real.v1.billing_portal, events=real.v1.events))
    return SimpleNamespace(real=real, fake=fake, client=hybrid, url=localstripe_url)


@pytest.fixture
def invoice(world, catalog):
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="300")
    usage(world.tenant, at=utc(2026, 1, 5), pool=catalog.shared, inp=1_000_000, out=1_000_000)  # 400 ¢
    usage(world.tenant, at=utc(2026, 1, 6), pool=catalog.shared, adapter=catalog.adapter.name, inp=500_000)  # 50 ¢
    [inv] = invoicing.period_close(period=date(2026, 1, 1), now=utc(2026, 2, 2))
    return inv


def _items(real, customer_id):
    return [i for i in real.v1.invoice_items.list(params={"customer": customer_id}).data]


def test_push_creates_customer_items_invoice_once(stripe_env, world, invoice, client):
    services.invoice_push(invoice=invoice, client=stripe_env.client)
    invoice.refresh_from_db()
    customer_id = BillingAccount.objects.for_tenant(world.tenant).get().stripe_customer_id
    assert customer_id.startswith("cus_")
    assert stripe_env.real.v1.customers.retrieve(customer_id).metadata["tenant_slug"] == "acme"
    items = _items(stripe_env.real, customer_id)
    lines = list(InvoiceLine.objects.for_tenant(world.tenant).filter(invoice=invoice))
    assert sorted(i.amount for i in items) == sorted(l.amount_cents for l in lines) == [50, 400]
    assert {i.metadata["invoice_uuid"] for i in items} == {str(invoice.uuid)}
    assert all(l.stripe_invoice_item_id.startswith("ii_") for l in lines)
    assert invoice.stripe_invoice_id == "in_fake_1"
    assert invoice.hosted_invoice_url == "https://invoice.stripe.test/in_fake_1"
    assert invoice.delivery == "sent"
    assert stripe_env.fake.calls == [("create", f"invoice:{invoice.uuid}:create"), ("finalize", f"invoice:{invoice.uuid}:finalize")]

    # A second push (e.g. a redelivered task) creates nothing new.
    services.invoice_push(invoice=invoice, client=stripe_env.client)
    Invoice.all_tenants.filter(pk=invoice.pk).update(hosted_invoice_url="")  # even one that crashed before finishing
    invoice.refresh_from_db()
    services.invoice_push(invoice=invoice, client=stripe_env.client)
    assert len(_items(stripe_env.real, customer_id)) == 2
    assert len(stripe_env.fake.by_key) == 1
    assert BillingAccount.objects.for_tenant(world.tenant).get().stripe_customer_id == customer_id

    # Pay: the customer pays on the hosted page; Stripe's signed webhook marks it paid; the console shows it.
    client.force_login(world.viewer)
    page = client.get(f"/t/acme/billing/invoices/{invoice.pk}/").content.decode()
    assert 'href="https://invoice.stripe.test/in_fake_1"' in page
    assert post_webhook(client, invoice_event("evt_pay_1", "invoice.paid", invoice)).status_code == 200
    page = client.get(f"/t/acme/billing/invoices/{invoice.pk}/").content.decode()
    assert 'data-status="paid"' in page and "data-pay" not in page


def test_stripe_invoice_is_finalized_with_the_name_it_was_billed_to(stripe_env, world, catalog, invoice, staff):
    """Stripe copies the customer's name onto an invoice when it is finalized: the push sets it to the billed-to name
    first, so Stripe's document names the customer as ours does, even for an invoice issued before a rename."""
    real = stripe_env.real.v1.customers
    tenant_rename(tenant=world.tenant, name="Acme Robotics GmbH", actor=staff)  # after January was issued
    names = []
    finalize = stripe_env.fake.finalize_invoice

    def finalize_seeing_the_customer(invoice_id, params=None, options=None):
        names.append(real.retrieve(BillingAccount.objects.for_tenant(world.tenant).get().stripe_customer_id).name)
        return finalize(invoice_id, params=params, options=options)

    stripe_env.fake.finalize_invoice = finalize_seeing_the_customer
    services.invoice_push(invoice=invoice, client=stripe_env.client)
    usage(world.tenant, at=utc(2026, 2, 5), pool=catalog.shared, inp=1_000_000)
    [february] = invoicing.period_close(period=date(2026, 2, 1), now=utc(2026, 3, 2))
    services.invoice_push(invoice=february, client=stripe_env.client)
    assert names == ["Acme", "Acme Robotics GmbH"]


def test_void_after_a_stopped_push_deletes_its_pending_items(stripe_env, world, invoice, staff):
    stripe_env.fake.fail["create"] = ["down"]  # items created at Stripe, then Stripe went away
    with pytest.raises(stripe_gateway.GatewayError):
        services.invoice_push(invoice=invoice, client=stripe_env.client)
    customer_id = BillingAccount.objects.for_tenant(world.tenant).get().stripe_customer_id
    assert len(_items(stripe_env.real, customer_id)) == 2  # pending: the tenant's next invoice would gather them

    services.invoice_void(invoice=invoice, reason="Wrong prices; written off", actor=staff)
    invoice.refresh_from_db()
    assert (invoice.status, invoice.pending_status) == ("open", "void")
    assert services.invoice_status_sync(invoice=invoice, client=stripe_env.client) == "void"
    assert _items(stripe_env.real, customer_id) == []
    assert services.invoice_status_sync(invoice=invoice, client=stripe_env.client) == "already void"  # 404s are fine
    invoice.refresh_from_db()
    assert invoice.status == "void" and not invoice.stripe_invoice_id


def test_customer_portal_absent_on_localstripe_is_handled(stripe_env, world, client):
    assert services.portal_url(tenant=world.tenant, return_url="http://testserver/", client=stripe_env.real) is None
    client.force_login(world.admin)
    response = client.post("/t/acme/billing/payment-methods/", follow=True)
    assert "Online payment is not available yet" in response.content.decode()


@pytest.mark.django_db(transaction=True)
def test_localstripe_delivers_really_signed_webhooks(stripe_env, world, live_server):
    from urllib.request import Request

    body = f"url={live_server.url}/webhooks/stripe/&secret={WEBHOOK_SECRET}".encode()
    urlopen(Request(f"{stripe_env.url}/_config/webhooks/billing_test", data=body, headers={"Authorization": "Bearer sk_test_localstripe"}), timeout=5)
    services.stripe_customer_ensure(tenant=world.other_tenant, client=stripe_env.real)
    deadline = time.monotonic() + 10
    # Wait for the outcome, not the row: on in-memory SQLite the live server shares the test's connection, so the
    # row is visible before the webhook's transaction sets its outcome.
    while not StripeEvent.objects.filter(type="customer.created").exclude(outcome="").exists():
        assert time.monotonic() < deadline, "localstripe's signed customer.created never arrived"
        time.sleep(0.1)
    assert StripeEvent.objects.get(type="customer.created").outcome == "ignored"
