"""One map of OpenAI's error types: the gateway (serving/gateway/errors.py) and the Django /v1 views
(finetune/v1_base.py, portal/views.py) shape the same status the same way, as OpenAI does."""

from __future__ import annotations

import json

import pytest

from common.openai_errors import error_body, error_type
from finetune.v1_base import openai_error
from serving.gateway.errors import ApiError


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 409, 413, 422, 429, 500, 502, 503, 504])
def test_the_gateway_and_the_django_v1_views_give_a_status_the_same_type(status):
    gateway = json.loads(ApiError(status, "m", code="c").openai_body())
    django = openai_error("m", status, "c").data
    assert gateway == django == error_body("m", status, "c")


def test_types_follow_openai():
    assert error_type(401) == "invalid_request_error"  # a bad key, as OpenAI answers it (code invalid_api_key)
    assert error_type(429) == "rate_limit_error"
    assert error_type(403) == "permission_error"
    assert error_type(500) == error_type(502) == "server_error"
    assert error_type(503) == "service_unavailable"
    assert error_type(418) == "invalid_request_error"


def test_an_explicit_type_wins():
    assert error_body("m", 429, "insufficient_quota", type="insufficient_quota")["error"]["type"] == "insufficient_quota"
