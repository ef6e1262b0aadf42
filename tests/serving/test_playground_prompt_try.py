"""Trying a system prompt version (a draft) in the playground before it goes live (issue 14, item 10): the page's
token carries the version's text, and the gateway applies it instead of the live prompt for that token only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from django.urls import reverse

from serving.gateway.parsing import inject_system_prompt
from tenants import services
from tests.support.snapshots import snapshot_with_key as _snapshot


@pytest.fixture
def drafts(world):
    owner = services.Actor(user=world.owner)
    services.system_prompt_save(tenant=world.tenant, text="Live: be brief.", note="", actor=owner)
    services.system_prompt_save(tenant=world.tenant, text="Draft: be kind.", note="", actor=owner, activate=False)
    return world


def playground(client, user, query=""):
    client.force_login(user)
    return client.get(reverse("console-playground", kwargs={"tenant_slug": "acme"}) + query)


def test_a_token_with_a_prompt_replaces_the_live_one_for_its_requests_only():
    from serving.gateway.auth import authenticate

    snap, raw = _snapshot(playground_users=frozenset({3}), system_prompt="Live: be brief.")
    trying = services.playground_token_issue(tenant=SimpleNamespace(pk=7), user=SimpleNamespace(pk=3), system_prompt="Draft: be kind.")
    plain = services.playground_token_issue(tenant=SimpleNamespace(pk=7), user=SimpleNamespace(pk=3))
    _, tenant = authenticate(f"Bearer {trying}", snap)
    assert tenant.system_prompt == "Draft: be kind." and tenant.id == 7
    assert inject_system_prompt([{"role": "user", "content": "hi"}], tenant.system_prompt, tenant.system_message_rule)[0] == {
        "role": "system", "content": "Draft: be kind."}
    assert authenticate(f"Bearer {plain}", snap)[1].system_prompt == "Live: be brief."
    assert authenticate(f"Bearer {raw}", snap)[1].system_prompt == "Live: be brief."  # API keys: the live prompt
    assert services.playground_token_read(trying[:-2] + "xx") is None  # the prompt is signed with the rest


def test_the_playground_tries_a_draft_when_asked(client, drafts):
    world = drafts
    page = playground(client, world.developer, "?prompt=2")
    assert page.status_code == 200
    token = services.playground_token_read(page.context["token"])
    assert (token.tenant_id, token.user_id, token.system_prompt) == (world.tenant.pk, world.developer.pk, "Draft: be kind.")
    html = page.content.decode()
    assert 'data-trying="2"' in html and "Draft: be kind." in html and "Make v2 live" in html
    assert services.playground_token_read(playground(client, world.developer).context["token"]).system_prompt is None
    assert services.playground_token_read(playground(client, world.developer, "?prompt=1").context["token"]).system_prompt is None  # live


def test_trying_is_the_tenants_own_and_for_playground_roles(client, drafts, world):
    assert playground(client, world.developer, "?prompt=99").status_code == 404
    services.system_prompt_save(tenant=world.other_tenant, text="Globex secret", note="", actor=services.Actor(user=world.outsider), activate=False)
    assert playground(client, world.outsider, "?prompt=2").status_code == 404  # acme's page
    client.force_login(world.outsider)
    globex = client.get(reverse("console-playground", kwargs={"tenant_slug": "globex"}) + "?prompt=1")
    assert services.playground_token_read(globex.context["token"]).system_prompt == "Globex secret"  # its own version 1
    assert playground(client, world.viewer, "?prompt=2").status_code == 403


def test_a_draft_too_long_for_a_header_is_not_tried(client, drafts, world, settings):
    import random
    import string

    rng = random.Random(1)
    text = "".join(rng.choice(string.ascii_letters) for _ in range(15_000))  # does not compress
    services.system_prompt_save(tenant=world.tenant, text=text, note="", actor=services.Actor(user=world.owner), activate=False)
    page = playground(client, world.developer, "?prompt=3")
    assert services.playground_token_read(page.context["token"]).system_prompt is None
    assert "too long to try here" in page.content.decode()
