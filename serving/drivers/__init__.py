"""Backend drivers: one interface over TGI, vLLM and the dev backend.

`driver_for(kind).stream(session, backend_url, request)` is an async iterator of events:
`TokenDelta` (text as it is generated) and `ToolCallDelta` (tool-call fragments) then exactly one `Finish` (finish reason and token counts), or it
raises `BackendError`. Drivers always stream from the backend, so the gateway knows the first-token time,
can count what it delivered, and can cancel by closing the connection.
"""

from __future__ import annotations

from serving.drivers.base import BackendError, BackendRequest, Finish, Sampling, TokenDelta, ToolCallDelta
from serving.drivers.tgi import TGIDriver
from serving.drivers.vllm import VLLMDriver
from serving.drivers.dev import DevDriver

_DRIVERS = {"tgi": TGIDriver(), "vllm": VLLMDriver(), "dev": DevDriver()}


def driver_for(kind: str):
    return _DRIVERS[kind]


__all__ = ["BackendError", "BackendRequest", "Finish", "Sampling", "TokenDelta", "ToolCallDelta", "driver_for"]
