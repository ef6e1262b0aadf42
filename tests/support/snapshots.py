"""Gateway snapshots built by hand (no database): a tenant entry with routes, and a snapshot holding one inference key."""

from __future__ import annotations

import hashlib


def tenant_entry(**fields):
    from serving.admission import TenantLimits
    from serving.config import TenantEntry
    from serving.routing import Route

    models = fields.pop("models", None) or {
        "base": Route("base", 1, None, "base", "platform", 0), "ft:mine": Route("ft:mine", 1, "ad-1", "base", "t", 0),
        "vbase": Route("vbase", 2, None, "vbase", "platform", 0),
    }
    values = dict(id=7, slug="t", active=True, suspended_reason="", weight=1, limits=TenantLimits(7), system_prompt="",
                  system_message_rule="keep", default_model="", default_max_tokens=256, max_max_tokens=1000,
                  default_temperature=0.7, max_temperature=1.0, cache_salt="salt-7", models=models)
    values.update(fields)
    return TenantEntry(**values)


def snapshot_with_key(key_fields=None, **tenant_fields):
    from serving.config import KeyEntry, Snapshot

    raw = "mtl_0123456789ab_" + "s" * 43
    key = KeyEntry(**{"id": 5, "prefix": raw[:16], "secret_hash": hashlib.sha256(raw.encode()).hexdigest(), "tenant_id": 7,
                      "scopes": frozenset({"inference"}), "expires_at": None, **(key_fields or {})})
    tenant = tenant_entry(**tenant_fields)
    return Snapshot(None, 0.0, keys={key.prefix: key}, tenants={7: tenant}), raw

