"""OpenAI's error shape, the one map of every /v1 face (the gateway and the Django /v1 views).

`{"error": {"message", "type", "param", "code"}}`, with `type` from the status as OpenAI answers it: a bad key is a
401 `invalid_request_error` (code `invalid_api_key`), as OpenAI's API and SDKs expect; 5xx are `server_error`
except 503 (`service_unavailable`)."""

from __future__ import annotations

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable"}


def error_type(status: int) -> str:
    """OpenAI's `type` for an HTTP status."""
    return ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "server_error")


def error_body(message: str, status: int, code: str | None = None, param: str | None = None,
               type: str | None = None) -> dict:
    """The error as OpenAI's API returns it (a dict, to be JSON-encoded by the caller's framework)."""
    return {"error": {"message": message, "type": type or error_type(status), "param": param, "code": code}}
