"""vLLM: the OpenAI API; the adapter is the `model`; the per-tenant `cache_salt` isolates prefix caching."""

from __future__ import annotations

from typing import AsyncIterator

import aiohttp

from serving.drivers.base import BackendRequest
from serving.drivers.openai_compat import openai_body, openai_stream


class VLLMDriver:
    kind = "vllm"

    def stream(self, session: aiohttp.ClientSession, backend_url: str, request: BackendRequest) -> AsyncIterator:
        path, body = openai_body(request, model=request.adapter or request.model_id, cache_salt=True, continuous_usage=True)
        return openai_stream(session, backend_url + path, body, chat=request.kind == "chat")
