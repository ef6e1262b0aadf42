"""Errors as the client's protocol shapes them: OpenAI `{"error": {...}}` on /v1, TGI `{"error","error_type"}`."""

from __future__ import annotations

import json

from common.openai_errors import error_body, error_type
from serving.gateway.endpoints import Endpoint, named


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict | None = None, tgi_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type(status)
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.tgi_type = tgi_type  # TGI's `error_type` where it differs from the code

    @classmethod
    def refusing(cls, refusal) -> ApiError:
        """From a `tenants.api_refusals.Refusal`: the wording every API shares."""
        return cls(refusal.status, refusal.message, type=refusal.type, code=refusal.code)

    def openai_body(self) -> bytes:
        return json.dumps(error_body(self.message, self.status, self.code, self.param, self.type)).encode()

    def tgi_body(self) -> bytes:
        return json.dumps({"error": self.message, "error_type": self.tgi_type or self.code or self.type}).encode()


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def context_length_exceeded(endpoint: Endpoint | str, overflow, max_tokens: int) -> ApiError:
    """OpenAI's answer to a prompt beyond the context, from the figures of the backend's refusal
    (`serving.drivers.base.ContextOverflow`); `max_tokens`: what the backend was asked for, if it did not say.
    `endpoint`: the request's (or its name)."""
    endpoint = named(endpoint)
    tgi = endpoint.tgi
    text = endpoint.prompt_param
    completion = "`max_new_tokens`" if tgi else "completion"
    head = f"This model's maximum context length is {overflow.limit} tokens. However, your {text}"
    prompt, asked = overflow.input_tokens, overflow.completion_tokens
    bound = "at least " if overflow.input_at_least else ""  # a backend that stopped counting
    if prompt is not None and asked is None:  # the prompt alone is too long
        message = f"{head} resulted in {bound}{prompt} tokens. Please reduce the length of the {text}."
    else:
        asked = asked if asked is not None else max_tokens
        if prompt is not None:
            message = (f"{head} resulted in {bound}{prompt + asked} tokens ({bound}{prompt} in the {text}, {asked} in "
                       f"{'the ' * (not tgi)}{completion}).")
        else:
            message = f"{head} and the {asked} tokens asked for the {'answer' if tgi else 'completion'} do not fit in it."
        message += f" Please reduce the length of the {text} or {completion}."
    return ApiError(400, message, param=text, code="context_length_exceeded", tgi_type="validation")
