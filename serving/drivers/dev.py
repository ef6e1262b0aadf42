"""The dev backend (devbackend): TGI's /generate_stream for text prompts, vLLM's API for chat."""

from __future__ import annotations

from typing import AsyncIterator

import aiohttp

from serving.drivers.base import BackendRequest
from serving.drivers.openai_compat import openai_body, openai_stream
from serving.drivers.tgi import generate_body, generate_stream


class DevDriver:
    kind = "dev"

    def stream(self, session: aiohttp.ClientSession, backend_url: str, request: BackendRequest) -> AsyncIterator:
        if request.kind == "chat":
            path, body = openai_body(request, model=request.adapter or request.model_id, cache_salt=False, continuous_usage=False)
            return openai_stream(session, backend_url + path, body, chat=True, adapter=request.adapter)
        return generate_stream(session, backend_url + "/generate_stream", generate_body(request))
