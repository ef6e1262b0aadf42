"""ASGI entry point. The inference paths go to the lean gateway app; Django serves everything else.

Dispatch happens here, before Django's handler, because Django's request cycle costs more than the
gateway's whole budget per request (docs/gateway.md). Lifespan events go to the gateway (Django has none).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django_application = get_asgi_application()

from serving.gateway import GatewayApp, is_gateway_path  # noqa: E402 - needs Django set up first

gateway = GatewayApp()


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        return await gateway.lifespan(scope, receive, send)
    if scope["type"] == "http" and is_gateway_path(scope):
        return await gateway(scope, receive, send)
    return await django_application(scope, receive, send)
