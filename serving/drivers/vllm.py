"""vLLM: the OpenAI API; the adapter is the `model`; the per-tenant `cache_salt` isolates prefix caching.

TGI's token events and `details` (the gateway's /generate routes) are vLLM's own figures: each token's id and
log-probability are asked for (`logprobs`, `return_token_ids`), and a sampled request gets a seed from the gateway
when it has none, so the seed TGI reports is the one used. A 404 for the request's adapter is `adapter_not_loaded`.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import AsyncIterator

import aiohttp

from serving.drivers.base import BackendRequest
from serving.drivers.openai_compat import openai_body, openai_stream


class VLLMDriver:
    kind = "vllm"

    def stream(self, session: aiohttp.ClientSession, backend_url: str, request: BackendRequest) -> AsyncIterator:
        details = request.want_tokens and request.kind == "text"
        seed = None
        if details and request.sampling.do_sample:
            if request.sampling.seed is None:  # TGI reports the seed it sampled with; vLLM does not say which it drew
                request = dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, seed=secrets.randbits(63)))
            seed = request.sampling.seed
        path, body = openai_body(request, model=request.adapter or request.model_id, cache_salt=True, continuous_usage=True,
                                 token_details=details)
        return openai_stream(session, backend_url + path, body, chat=request.kind == "chat", adapter=request.adapter,
                             token_details=details, seed=seed, special_ids=request.special_ids)
