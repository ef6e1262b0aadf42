"""The Playground page (issue 14, item 8): its controls, the comparison's default pair (base vs adapter), and the
system prompt typed for a try, which the console signs into a new playground token of the same kind as a draft's
(bounded in size; the tenant's own; developers and up). The browser test (tests/browser/test_playground.py) streams."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from serving.gateway.auth import authenticate
from serving.models import BackendPool, BaseModel
from serving.views import PLAYGROUND_OVERRIDE_MAX_CHARS
from tenants import services
from tests.support.gateway import deploy_adapter
from tests.support.snapshots import tenant_entry


@pytest.fixture
def served(world):
    base = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat", context_length=1024)
    pool = BackendPool.objects.create(name="shared", base_model=base, kind="dev")
    deploy_adapter(world.tenant, "ft:tiny-chat:acme:support:1", base, pool)
    services.system_prompt_save(tenant=world.tenant, text="Live: be brief.", note="", actor=services.Actor(user=world.owner))
    return world


def url(slug="acme"):
    return reverse("console-playground", kwargs={"tenant_slug": slug})


def test_the_page_has_the_conversation_parameters_comparison_and_code(client, served):
    client.force_login(served.developer)
    page = client.get(url())
    assert page.status_code == 200
    html = page.content.decode()
    for control in ('id="pg-model"', 'id="pg-model-b"', 'id="pg-compare"', 'id="pg-temperature"', 'id="pg-top-p"', 'id="pg-max"',
                    'id="pg-stop-seq"', 'id="pg-stop" disabled', 'id="pg-system-text"', 'id="pg-message"', 'id="pg-clear"', 'id="pg-code-toggle"',
                    'role="log" aria-live="polite"', "console/playground.js", "csrfmiddlewaretoken"):
        assert control in html, control
    ids = re.findall(r'\sid="([^"]+)"', html)
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)  # each control its own label target
    # Compared by default: the base model beside the tenant's adapter.
    assert page.context["default_model"] == "tiny-chat" and page.context["compare_model"] == "ft:tiny-chat:acme:support:1"
    assert ">Live: be brief.</textarea>" in html  # the prompt in force, ready to edit for the try


def override(client, user, slug="acme", **fields):
    client.force_login(user)
    return client.post(url(slug), fields)


def test_a_typed_system_prompt_gets_a_token_that_carries_it(client, served):
    answer = override(client, served.admin, system_prompt="Try: answer in French.\r\nAlways.")
    assert answer.status_code == 200
    token = services.playground_token_read(answer.json()["token"])
    assert (token.tenant_id, token.user_id, token.system_prompt) == (served.tenant.pk, served.admin.pk, "Try: answer in French.\nAlways.")
    assert "no-store" in answer["Cache-Control"]
    # The gateway applies it in place of the live prompt, for this token only.
    from serving.config import Snapshot

    entry = tenant_entry(id=served.tenant.pk, playground_users=frozenset({served.admin.pk}), system_prompt="Live: be brief.")
    snap = Snapshot(None, 0.0, keys={}, tenants={served.tenant.pk: entry})
    assert authenticate(f"Bearer {answer.json()['token']}", snap)[1].system_prompt == "Try: answer in French.\nAlways."
    # Empty: no system prompt at all for the try.
    empty = services.playground_token_read(override(client, served.admin, system_prompt="").json()["token"])
    assert empty.system_prompt == ""
    assert authenticate(f"Bearer {override(client, served.admin, system_prompt='').json()['token']}", snap)[1].system_prompt == ""
    # Back to the live prompt: a plain token, and the live text to show.
    reset = override(client, served.admin, reset="1").json()
    assert services.playground_token_read(reset["token"]).system_prompt is None and reset["system_prompt"] == "Live: be brief."
    served.tenant.refresh_from_db()
    assert served.tenant.active_prompt.text == "Live: be brief."  # trying changed nothing live


def test_a_typed_system_prompt_is_bounded(client, served):
    import random
    import string

    too_long = override(client, served.admin, system_prompt="a" * (PLAYGROUND_OVERRIDE_MAX_CHARS + 1))
    assert too_long.status_code == 400 and "at most 10,000" in too_long.json()["error"] and "token" not in too_long.json()
    rng = random.Random(2)
    noise = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(PLAYGROUND_OVERRIDE_MAX_CHARS))  # does not compress
    unfit = override(client, served.admin, system_prompt=noise)
    assert unfit.status_code == 400 and "too long to try here" in unfit.json()["error"]
    assert override(client, served.admin).status_code == 400  # neither a text nor reset


def test_a_typed_system_prompt_is_for_those_who_may_write_the_prompt_of_the_tenant_only(client, served):
    assert override(client, served.viewer, system_prompt="x").status_code == 403
    refused = override(client, served.developer, system_prompt="")  # a developer may not drop the admins' prompt
    assert refused.status_code == 403 and "token" not in refused.json()
    page = client.get(url()).content.decode()
    assert 'id="pg-system-apply"' not in page and "readonly>Live: be brief.</textarea>" in page
    client.force_login(served.admin)
    assert 'id="pg-system-apply"' in client.get(url()).content.decode()
    assert override(client, served.outsider, system_prompt="x").status_code == 404  # acme's page
    own = override(client, served.outsider, slug="globex", system_prompt="x")  # its own tenant's token, not acme's
    assert services.playground_token_read(own.json()["token"]).tenant_id == served.other_tenant.pk
    client.logout()
    assert client.post(url(), {"system_prompt": "x"}).status_code == 302  # to the login page


def test_a_saved_versions_token_is_renewed_for_playground_roles(client, served):
    services.system_prompt_save(tenant=served.tenant, text="Draft: be kind.", note="", actor=services.Actor(user=served.owner), activate=False)
    renewed = override(client, served.developer, prompt="2")
    assert renewed.status_code == 200 and renewed.json()["system_prompt"] == "Draft: be kind."
    token = services.playground_token_read(renewed.json()["token"])
    assert (token.tenant_id, token.user_id, token.system_prompt) == (served.tenant.pk, served.developer.pk, "Draft: be kind.")
    assert override(client, served.developer, prompt="99").status_code == 404
    services.system_prompt_save(tenant=served.other_tenant, text="Globex secret", note="", actor=services.Actor(user=served.outsider))
    assert override(client, served.outsider, prompt="1").status_code == 404  # acme's page
    assert override(client, served.viewer, prompt="2").status_code == 403
    client.force_login(served.developer)
    assert 'data-trying="2" novalidate' in client.get(url() + "?prompt=2").content.decode()  # what the page renews
