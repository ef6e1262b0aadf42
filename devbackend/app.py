"""`create_app`: an aiohttp application for one model (or the simulator) in one flavor."""

from __future__ import annotations

from aiohttp import web

from . import dev_routes, openai_routes, service_routes, tgi_routes
from .config import BackendConfig
from .generation import BACKEND
from .state import Backend


def _engine(config: BackendConfig):
    if config.simulate:
        from .sim_engine import SimEngine

        return SimEngine(config)
    from .model_engine import ModelEngine  # imports torch: only when a real model is served

    return ModelEngine(config)


def create_app(config: BackendConfig) -> web.Application:
    """Loads the model (seconds for the tiny one) and wires the routes the flavor serves."""
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[BACKEND] = Backend(config, _engine(config))
    tgi_routes.add_routes(app)
    openai_routes.add_routes(app, runtime_lora=config.flavor != "tgi")
    service_routes.add_routes(app)
    dev_routes.add_routes(app)
    return app
