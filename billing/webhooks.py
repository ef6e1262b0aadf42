"""POST /webhooks/stripe/: verified on the raw body, applied once, answered quickly."""

from __future__ import annotations

import logging

from django.http import HttpResponseBadRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from billing import services, stripe_gateway

log = logging.getLogger(__name__)


@csrf_exempt  # Stripe cannot send a CSRF token; the HMAC signature authenticates the request instead.
@require_POST
def stripe_webhook(request):
    try:
        event = stripe_gateway.construct_event(request.body, request.headers.get("Stripe-Signature", ""))
    except stripe_gateway.MalformedEvent as exc:
        log.warning("Rejected a signed Stripe webhook that is not an event: %s", exc)
        return HttpResponseBadRequest(f"Not an event: {exc}.")
    except stripe_gateway.SignatureError as exc:
        log.warning("Rejected Stripe webhook: %s", exc)
        return HttpResponseBadRequest("Invalid signature.")
    outcome = services.stripe_event_apply(event=event, source="webhook")
    return JsonResponse({"received": True, "outcome": outcome})
