"""ASGI entry point. The inference paths go to the lean gateway app; Django serves everything else.

Dispatch happens here, before Django's handler, because Django's request cycle costs more than the
gateway's whole budget per request (docs/gateway.md). Lifespan events go to the gateway (Django has none).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django_application = get_asgi_application()

from portal.security import development_only_reason, is_loopback, limit_body  # noqa: E402
from serving.gateway import GatewayApp, is_gateway_path  # noqa: E402 - needs Django set up first
from tenants.ratelimit import refuse_early  # noqa: E402

gateway = GatewayApp()
django_application = limit_body(django_application)  # the gateway caps its own bodies
# A tenant past its API rate is refused from the headers, before Django reads its body (tenants/ratelimit.py).
django_application = refuse_early(django_application)
_LOOPBACK_ONLY = development_only_reason()
_REFUSAL = (f"This platform runs with {_LOOPBACK_ONLY} and answers on loopback only. To serve other addresses set "
            "PLATFORM_ENV=production and DJANGO_SECRET_KEY (docs/configuration.md).\n").encode()


async def _refuse_non_loopback(send) -> None:
    await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "http.response.body", "body": _REFUSAL})


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        return await gateway.lifespan(scope, receive, send)
    if _LOOPBACK_ONLY and scope["type"] == "http" and not is_loopback((scope.get("server") or (None,))[0]):
        return await _refuse_non_loopback(send)
    if scope["type"] == "http" and is_gateway_path(scope):
        return await gateway(scope, receive, send)
    return await django_application(scope, receive, send)
