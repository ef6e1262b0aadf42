"""Per-key controls and rotation (tenants.services), and how the gateway's snapshot and authentication apply them."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from serving.config import load_snapshot
from serving.gateway.auth import authenticate
from serving.gateway.errors import ApiError
from serving.gateway.plan import route_for
from tenants import services
from tenants.models import AuditEvent
from tenants.services import Actor
from tests.support.gateway import make_base_model, make_pool


def _key(world, **kw):
    return services.api_key_create(tenant=world.tenant, name="prod", scopes=["inference"], actor=Actor(user=world.owner), **kw)


def test_rotation_keeps_the_old_secret_for_the_grace_period_then_refuses_it(world):
    key, old = _key(world)
    key, new = services.api_key_rotate(key=key, grace=timedelta(hours=1), actor=Actor(user=world.admin))
    assert new != old and new.startswith(key.prefix + "_")
    assert services.api_key_authenticate(new).pk == key.pk
    assert services.api_key_authenticate(old).pk == key.pk  # within the grace period
    snap = load_snapshot()
    assert authenticate(f"Bearer {old}", snap)[0].id == key.pk
    assert authenticate(f"Bearer {new}", snap)[0].id == key.pk
    event = AuditEvent.objects.for_tenant(world.tenant).get(action="api_key.rotated")
    assert event.actor == world.admin and event.data["prefix"] == key.prefix

    type(key).objects.for_tenant(world.tenant).filter(pk=key.pk).update(previous_valid_until=timezone.now() - timedelta(seconds=1))
    assert services.api_key_authenticate(old) is None  # grace over
    with pytest.raises(ApiError) as refused:
        authenticate(f"Bearer {old}", load_snapshot())
    assert (refused.value.status, refused.value.code) == (401, "invalid_api_key")
    assert authenticate(f"Bearer {new}", load_snapshot())[0].id == key.pk


def test_rotation_without_grace_refuses_the_old_secret_at_once_and_a_revoked_key_cannot_rotate(world):
    key, old = _key(world)
    key, new = services.api_key_rotate(key=key, grace=timedelta(0), actor=Actor(user=world.owner))
    assert services.api_key_authenticate(old) is None and services.api_key_authenticate(new) is not None
    with pytest.raises(ValidationError):
        services.api_key_rotate(key=key, grace=timedelta(days=31), actor=Actor(user=world.owner))
    services.api_key_revoke(key=key, actor=Actor(user=world.owner))
    with pytest.raises(ValidationError):
        services.api_key_rotate(key=key, grace=timedelta(hours=1), actor=Actor(user=world.owner))


def test_key_controls_are_validated_and_audited(world):
    key, _ = _key(world)
    with pytest.raises(ValidationError) as refused:
        services.api_key_controls_update(key=key, actor=Actor(user=world.owner), tenant_models={"tiny-chat"},
                                         requests_per_minute=-1, allowed_models=["big-chat"])
    assert set(refused.value.message_dict) == {"requests_per_minute", "allowed_models"}
    services.api_key_controls_update(key=key, actor=Actor(user=world.owner), tenant_models={"tiny-chat", "big-chat"},
                                     requests_per_minute=30, tokens_per_minute=5000, monthly_token_budget=100_000,
                                     monthly_budget_cents=2500, allowed_models=["tiny-chat"])
    key.refresh_from_db()
    assert (key.requests_per_minute, key.tokens_per_minute, key.monthly_token_budget, key.monthly_budget_cents, key.allowed_models) == (
        30, 5000, 100_000, 2500, ["tiny-chat"])
    event = AuditEvent.objects.for_tenant(world.tenant).get(action="api_key.limits_changed")
    assert event.data["monthly_budget_cents"] == {"from": 0, "to": 2500}
    entry = load_snapshot().keys[key.prefix]
    assert (entry.requests_per_minute, entry.tokens_per_minute, entry.monthly_token_budget, entry.monthly_budget_cents) == (30, 5000, 100_000, 2500)


def test_a_key_limited_to_some_models_is_refused_the_others_with_model_not_found(world):
    for name in ("tiny-chat", "big-chat"):
        make_pool(f"shared-{name}", make_base_model(name), ["http://b:1"])
    limited, limited_secret = _key(world)
    _, open_secret = _key(world)
    services.api_key_controls_update(key=limited, actor=Actor(user=world.owner), tenant_models={"tiny-chat", "big-chat"},
                                     allowed_models=["tiny-chat"])
    snap = load_snapshot()
    _, tenant = authenticate(f"Bearer {limited_secret}", snap)
    assert set(tenant.models) == {"tiny-chat"} and route_for(tenant, "tiny-chat").name == "tiny-chat"
    with pytest.raises(ApiError) as refused:
        route_for(tenant, "big-chat")
    assert (refused.value.status, refused.value.code, refused.value.param) == (404, "model_not_found", "model")
    _, everything = authenticate(f"Bearer {open_secret}", snap)
    assert set(everything.models) == {"tiny-chat", "big-chat"}  # the tenant's other keys are not limited
