"""Errors as the client's protocol shapes them: OpenAI `{"error": {...}}` on /v1, TGI `{"error","error_type"}`."""

from __future__ import annotations

import json

OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or OPENAI_TYPES.get(status, "api_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    @classmethod
    def refusing(cls, refusal) -> ApiError:
        """From a `tenants.api_refusals.Refusal`: the wording every API shares."""
        return cls(refusal.status, refusal.message, type=refusal.type, code=refusal.code)

    def openai_body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}).encode()

    def tgi_body(self) -> bytes:
        return json.dumps({"error": self.message, "error_type": self.code or self.type}).encode()


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)
