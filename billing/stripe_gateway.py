"""The one module that talks to Stripe (and the only one that imports `stripe`).

Functions take an optional `client`: a `stripe.StripeClient` by default (API base overridable with
STRIPE_API_BASE, e.g. localstripe), or any object with the same `v1.…` services (tests use a fake for
what localstripe lacks). Every POST carries an idempotency key derived from our ids, and every Stripe id
we get back is stored, so a retried or repeated push creates nothing new.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import stripe
from django.conf import settings

from common.parsers import json_loads

log = logging.getLogger(__name__)

API_VERSION = "2026-10-28.endive"  # pinned: the version stripe 16.1 is built for
WEBHOOK_TOLERANCE_S = 300


class GatewayError(Exception):
    """Stripe could not be reached or refused a call; the caller may retry."""


class NotFound(GatewayError):
    """Stripe has no such object (deleted, or never created)."""


class SignatureError(Exception):
    """A webhook whose signature, timestamp or body does not verify."""


class MalformedEvent(SignatureError):
    """A correctly signed body that is not an event of Stripe's shape."""


def is_configured() -> bool:
    return bool(settings.STRIPE_SECRET_KEY)


def client() -> "stripe.StripeClient | None":
    """A StripeClient for the configured key and API base, or None when Stripe is not configured."""
    if not is_configured():
        return None
    kwargs = {"stripe_version": API_VERSION, "max_network_retries": 2}
    if settings.STRIPE_API_BASE:
        kwargs["base_addresses"] = {"api": settings.STRIPE_API_BASE.rstrip("/")}
    return stripe.StripeClient(settings.STRIPE_SECRET_KEY, **kwargs)


def _client(given):
    c = given or client()
    if c is None:
        raise GatewayError("Stripe is not configured (STRIPE_SECRET_KEY is unset).")
    return c


def _as_dict(obj) -> dict:
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def _gateway_error(what: str, exc: stripe.StripeError) -> GatewayError:
    if exc.http_status == 404 or getattr(exc, "code", None) == "resource_missing":
        return NotFound(f"{what}: {exc}")
    return GatewayError(f"{what}: {exc}")


def construct_event(payload: bytes, signature_header: str, *, secret: str | None = None) -> dict:
    """Verify a webhook on its raw body (HMAC-SHA256, 300 s tolerance) and return the event as a dict."""
    secret = secret if secret is not None else settings.STRIPE_WEBHOOK_SECRET
    if not secret:
        raise SignatureError("STRIPE_WEBHOOK_SECRET is not set.")
    try:
        stripe.WebhookSignature.verify_header(payload, signature_header, secret, tolerance=WEBHOOK_TOLERANCE_S)
    except (stripe.SignatureVerificationError, ValueError, TypeError, AttributeError) as exc:
        raise SignatureError(str(exc) or exc.__class__.__name__) from None
    # Stripe's check refuses only old timestamps; a signature made for the future would stay replayable until then.
    stamps = [part[2:] for part in signature_header.split(",") if part.startswith("t=")]
    if not stamps or not stamps[0].isdigit() or int(stamps[0]) > time.time() + WEBHOOK_TOLERANCE_S:
        raise SignatureError("Timestamp outside the tolerance zone (in the future).")
    # Signed, so it is Stripe's (or whoever holds the secret): parsed with the platform's bounded loader, so a body
    # nested too deep or holding a lone UTF-16 surrogate is a malformed event (400), not a 500 or "invalid signature".
    try:
        event = json_loads(payload)
    except ValueError as exc:
        raise MalformedEvent(f"the body is not usable JSON: {exc}") from None
    if not isinstance(event, dict):
        raise MalformedEvent("the body must be a JSON object")
    problem = _event_shape_problem(event)
    if problem:
        raise MalformedEvent(problem)
    return event


def _event_shape_problem(event: dict) -> str | None:
    """What is wrong with a verified event's shape, else None (signed garbage must be a 400, never a 500)."""
    if not isinstance(event.get("id"), str) or not event["id"]:
        return "`id` must be a non-empty string"
    if not isinstance(event.get("type"), str):
        return "`type` must be a string"
    created = event.get("created", 0)
    if not isinstance(created, int) or isinstance(created, bool) or not 0 <= created < 2**33:
        return "`created` must be a Unix timestamp"
    data = event.get("data", {})
    if not isinstance(data, dict) or not isinstance(data.get("object", {}), dict):
        return "`data.object` must be an object"
    return None


def customer_create(*, tenant_id: int, slug: str, name: str, email: str, client=None) -> str:
    """Create the tenant's Stripe customer; returns its id (`cus_…`)."""
    c = _client(client)
    try:
        customer = c.v1.customers.create(
            params={"name": name, "email": email, "metadata": {"tenant_id": str(tenant_id), "tenant_slug": slug}},
            options={"idempotency_key": f"tenant:{tenant_id}:customer"},
        )
    except stripe.StripeError as exc:
        raise GatewayError(f"customer create: {exc}") from exc
    return customer.id


def customer_name_set(*, invoice_uuid, customer_id: str, name: str, client=None) -> None:
    """Name the customer as the invoice about to be finalized is billed to (Stripe copies the customer's name onto
    an invoice when it finalizes it); key `invoice:{uuid}:customer_name`."""
    c = _client(client)
    try:
        c.v1.customers.update(customer_id, params={"name": name}, options={"idempotency_key": f"invoice:{invoice_uuid}:customer_name"})
    except stripe.StripeError as exc:
        raise GatewayError(f"customer update: {exc}") from exc


@dataclass
class PushedInvoice:
    stripe_invoice_id: str
    hosted_invoice_url: str
    status: str


def invoice_item_create(*, invoice_uuid, line_id: int, customer_id: str, amount_cents: int, currency: str, description: str, client=None) -> str:
    """One pending invoice item for a line; key `invoice:{uuid}:item:{line_id}`."""
    c = _client(client)
    try:
        item = c.v1.invoice_items.create(
            params={
                "customer": customer_id,
                "amount": amount_cents,
                "currency": currency,
                "description": description[:250],
                "metadata": {"invoice_uuid": str(invoice_uuid), "line_id": str(line_id)},
            },
            options={"idempotency_key": f"invoice:{invoice_uuid}:item:{line_id}"},
        )
    except stripe.StripeError as exc:
        raise GatewayError(f"invoice item create: {exc}") from exc
    return item.id


def invoice_create(*, invoice_uuid, number: str, customer_id: str, days_until_due: int, client=None) -> str:
    """The Stripe invoice gathering the customer's pending items; key `invoice:{uuid}:create`."""
    c = _client(client)
    try:
        inv = c.v1.invoices.create(
            params={
                "customer": customer_id,
                "collection_method": "send_invoice",
                "days_until_due": days_until_due,
                "pending_invoice_items_behavior": "include",
                "auto_advance": False,
                "description": f"Invoice {number}",
                "metadata": {"invoice_uuid": str(invoice_uuid), "number": number},
            },
            options={"idempotency_key": f"invoice:{invoice_uuid}:create"},
        )
    except stripe.StripeError as exc:
        raise GatewayError(f"invoice create: {exc}") from exc
    return inv.id


def invoice_finalize(*, invoice_uuid, stripe_invoice_id: str, client=None) -> PushedInvoice:
    """Finalize (draft → open at Stripe); key `invoice:{uuid}:finalize`. Returns the hosted URL."""
    c = _client(client)
    try:
        inv = c.v1.invoices.finalize_invoice(stripe_invoice_id, options={"idempotency_key": f"invoice:{invoice_uuid}:finalize"})
    except stripe.StripeError as exc:
        raise GatewayError(f"invoice finalize: {exc}") from exc
    return PushedInvoice(inv.id, getattr(inv, "hosted_invoice_url", "") or "", inv.status)


def invoice_retrieve(stripe_invoice_id: str, *, client=None) -> dict:
    """The invoice as Stripe has it now (to re-check state when events arrive out of order). NotFound if gone."""
    c = _client(client)
    try:
        return _as_dict(c.v1.invoices.retrieve(stripe_invoice_id))
    except stripe.StripeError as exc:
        raise _gateway_error("invoice retrieve", exc) from exc


def invoice_void(*, invoice_uuid, stripe_invoice_id: str, client=None) -> str:
    """Void a finalized invoice (open or uncollectible → void); key `invoice:{uuid}:void`. Returns Stripe's status."""
    return _invoice_action(_client(client).v1.invoices.void_invoice, stripe_invoice_id, f"invoice:{invoice_uuid}:void", "invoice void")


def invoice_mark_uncollectible(*, invoice_uuid, stripe_invoice_id: str, client=None) -> str:
    """Open → uncollectible (still payable); key `invoice:{uuid}:mark_uncollectible`. Returns Stripe's status."""
    return _invoice_action(_client(client).v1.invoices.mark_uncollectible, stripe_invoice_id,
                           f"invoice:{invoice_uuid}:mark_uncollectible", "invoice mark uncollectible")


def _invoice_action(method, stripe_invoice_id: str, idempotency_key: str, what: str) -> str:
    try:
        return method(stripe_invoice_id, options={"idempotency_key": idempotency_key}).status
    except stripe.StripeError as exc:
        raise _gateway_error(what, exc) from exc


def invoice_draft_delete(stripe_invoice_id: str, *, client=None) -> None:
    """Delete a never-finalized invoice (Stripe voids only finalized ones). One already gone counts as deleted."""
    _delete(_client(client).v1.invoices, stripe_invoice_id, "invoice delete")


def invoice_item_delete(item_id: str, *, client=None) -> None:
    """Delete a pending invoice item, so a later invoice for the customer does not gather it. Gone = deleted."""
    _delete(_client(client).v1.invoice_items, item_id, "invoice item delete")


def _delete(service, object_id: str, what: str) -> None:
    # A DELETE repeated after a lost answer finds nothing: that is the outcome we wanted.
    try:
        service.delete(object_id)
    except stripe.StripeError as exc:
        error = _gateway_error(what, exc)
        if not isinstance(error, NotFound):
            raise error from exc


def portal_session_url(*, customer_id: str, return_url: str, client=None) -> str | None:
    """A Customer Portal session URL, or None where the portal is unavailable (e.g. localstripe)."""
    c = _client(client)
    try:
        session = c.v1.billing_portal.sessions.create(params={"customer": customer_id, "return_url": return_url})
    except (stripe.StripeError, AttributeError) as exc:
        log.warning("Customer Portal unavailable: %s", exc)
        return None
    return getattr(session, "url", None)


def events_since(created_gte: int, *, client=None, limit: int = 1000) -> list[dict]:
    """Events created at or after `created_gte` (Unix seconds), oldest first, for reconciliation."""
    c = _client(client)
    try:
        page = c.v1.events.list(params={"created": {"gte": created_gte}, "limit": 100})
        events = []
        for event in page.auto_paging_iter():
            events.append(_as_dict(event))
            if len(events) >= limit:
                break
    except stripe.StripeError as exc:
        raise GatewayError(f"events list: {exc}") from exc
    return sorted(events, key=lambda e: e.get("created", 0))
