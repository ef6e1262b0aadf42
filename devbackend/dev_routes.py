"""Test-only routes under /_dev/: inject faults and read what the backend saw. Never expose in production."""

from __future__ import annotations

from dataclasses import asdict

from aiohttp import web

from .generation import backend_of, read_json
from .protocol import BackendError
from .state import Faults
from .tgi_routes import tgi_error


async def set_faults(request: web.Request) -> web.Response:
    backend = backend_of(request)
    try:
        backend.faults.update(await read_json(request))
    except BackendError as error:
        return tgi_error(error)
    return web.json_response(asdict(backend.faults))


async def reset_faults(request: web.Request) -> web.Response:
    backend = backend_of(request)
    backend.faults = Faults()
    return web.json_response(asdict(backend.faults))


async def stats(request: web.Request) -> web.Response:
    backend = backend_of(request)
    return web.json_response({**backend.stats.as_json(), "adapters": dict(backend.engine.adapters),
                              "flavor": backend.config.flavor, "model_id": backend.engine.model_id})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/_dev/faults", set_faults)
    app.router.add_post("/_dev/faults/reset", reset_faults)
    app.router.add_get("/_dev/stats", stats)
