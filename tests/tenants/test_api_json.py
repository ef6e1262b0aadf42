"""Hostile JSON on the management API (common/parsers.py, REST_FRAMEWORK's DEFAULT_PARSER_CLASSES): nesting beyond
64 levels and lone UTF-16 surrogates are 400s that say what to change, and nothing is stored."""

from __future__ import annotations

import pytest

from tenants.models import ApiKey, AuditEvent, SystemPromptVersion
from tests.support.management_api import as_key, as_user, make_key, url

DEEP = [b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"[" * 1_000_000, b'{"text": "x", "note": ' + b"[" * 64 + b"]" * 64 + b"}"]


def post_raw(client, path: str, body: bytes, content_type: str = "application/json"):
    client.raise_request_exception = False  # a 500 is an answer to assert on, not an exception in the test
    return client.post(path, data=body, content_type=content_type)


@pytest.mark.parametrize("body", DEEP, ids=["text-100000-deep", "brackets-1e6", "65-deep"])
def test_json_nested_too_deep_is_a_400_parse_error(world, body):
    for client, path in ((as_user(world.admin), url(world, "prompts/")), (as_key(make_key(world.tenant)[1]), url(world, "keys/"))):
        response = post_raw(client, path, body)
        assert response.status_code == 400, response.content[:300]
        detail = response.json()["detail"]
        assert detail.startswith("JSON parse error - ") and "nested deeper than 64 levels" in detail
    assert not SystemPromptVersion.objects.for_tenant(world.tenant).exists()


def test_json_64_levels_deep_is_read(world):
    body = b'{"text": "Be brief.", "ignored": ' + b"[" * 63 + b"]" * 63 + b"}"  # the body object is the 64th level
    assert post_raw(as_user(world.admin), url(world, "prompts/"), body).status_code == 201


@pytest.mark.parametrize("body, field", [
    (b'{"text": "Be \\ud800brief."}', "text"),
    (b'{"text": "ok", "note": "\\udfff"}', "note"),
    (b'{"text": "ok", "\\ud800": 1}', "non_field_errors"),
    (b'{"text": "ok", "extra": [{"a": "\\udbff"}]}', "extra"),
    ('{"text": "Be \ud800brief."}'.encode("utf-8", "surrogatepass"), "text"),  # raw, as UTF-8 bytes of the surrogate
], ids=["escaped-in-text", "in-note", "in-a-key", "nested", "raw-utf8"])
def test_a_lone_surrogate_is_a_400_field_error_and_nothing_is_stored(world, body, field):
    response = post_raw(as_user(world.admin), url(world, "prompts/"), body)
    assert response.status_code == 400, response.content[:300]
    errors = response.json()
    assert list(errors) == [field] and len(errors[field]) == 1
    assert "lone UTF-16 surrogate" in errors[field][0] and "send valid Unicode" in errors[field][0]
    assert not SystemPromptVersion.objects.for_tenant(world.tenant).exists()
    assert not AuditEvent.objects.for_tenant(world.tenant).filter(action="prompt.saved").exists()


def test_a_lone_surrogate_in_a_key_name_is_refused_before_it_is_stored(world):
    response = post_raw(as_user(world.admin), url(world, "keys/"), b'{"name": "ci \\ud83d", "scopes": ["inference"]}')
    assert response.status_code == 400
    assert "`name` contains a lone UTF-16 surrogate (\\ud83d)" in response.json()["name"][0]
    assert not ApiKey.objects.for_tenant(world.tenant).exists()


def test_an_emoji_escaped_as_a_surrogate_pair_is_stored(world):
    response = post_raw(as_user(world.admin), url(world, "prompts/"), b'{"text": "Be brief \\ud83d\\ude00"}')
    assert response.status_code == 201, response.content
    assert SystemPromptVersion.objects.for_tenant(world.tenant).get().text == "Be brief 😀"


def test_other_charsets_and_malformed_json_are_still_parse_errors(world):
    client = as_user(world.admin)
    latin1 = post_raw(client, url(world, "prompts/"), '{"text": "Caf\u00e9"}'.encode("latin-1"), "application/json; charset=latin-1")
    assert latin1.status_code == 201 and SystemPromptVersion.objects.for_tenant(world.tenant).get().text == "Caf\u00e9"
    for body in (b'{"text": ', b'{"text": NaN}', b'{"text": "\xff"}'):
        response = post_raw(client, url(world, "prompts/"), body)
        assert response.status_code == 400 and response.json()["detail"].startswith("JSON parse error - "), response.content
