"""The inference gateway (raw ASGI). `portal.asgi` sends the inference paths here before Django.

Run it (with the rest of the site): `uvicorn portal.asgi:application`. Alone: `GatewayApp()` is an ASGI app.
"""

from serving.gateway.app import GatewayApp, is_gateway_path

__all__ = ["GatewayApp", "is_gateway_path"]
