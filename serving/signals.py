"""Bump the gateway's config version after any change it caches (serving.config).

Services often write with `QuerySet.update()` (no post_save), but every one of them records an
AuditEvent in the same transaction: listening to AuditEvent as well catches revocations, suspensions
and prompt activations. The bump runs on commit, so a gateway never reloads before the change is visible.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.db.models.signals import post_delete, post_save

log = logging.getLogger(__name__)


def _bump() -> None:
    from serving.config import config_version_bump

    try:
        config_version_bump()
    except Exception:  # a failed bump must not fail the change; gateways also reload every minute
        log.exception("could not bump the gateway config version")


def config_changed(sender, **kwargs) -> None:
    if kwargs.get("raw"):  # loaddata
        return
    transaction.on_commit(_bump)


def connect() -> None:
    from serving.models import Adapter, AdapterDeployment, AdapterRollout, Backend, BackendPool, BaseModel, MergedModel, ModelConfig
    from tenants.models import ApiKey, AuditEvent, Membership, PlatformSettings, Policy, SystemPromptVersion, Tenant

    for model in (Tenant, Membership, ApiKey, SystemPromptVersion, Policy, PlatformSettings, AuditEvent,
                  ModelConfig, BaseModel, BackendPool, Backend, Adapter, AdapterDeployment, AdapterRollout, MergedModel):
        post_save.connect(config_changed, sender=model, dispatch_uid=f"gateway-config-{model.__name__}-save")
        post_delete.connect(config_changed, sender=model, dispatch_uid=f"gateway-config-{model.__name__}-delete")
