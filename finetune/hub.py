"""Optional copy of trained adapters to a private Hugging Face Hub repository per tenant."""

from __future__ import annotations

import re

from django.conf import settings
from huggingface_hub import HfApi

from serving.models import Adapter


def hub_enabled() -> bool:
    return bool(settings.PLATFORM_HF_HUB_TOKEN and settings.PLATFORM_HF_HUB_NAMESPACE)


def push_on_commit(adapter_id: int, tenant_id: int) -> None:
    """When the Hub is configured: copy the adapter (trained or uploaded) to the tenant's repository once the current
    transaction commits (`finetune.tasks.push_adapter_to_hub`)."""
    from common.queue import enqueue_on_commit

    if hub_enabled():
        enqueue_on_commit("finetune.tasks.push_adapter_to_hub", adapter_id, tenant_id)


def tenant_repo_id(tenant_slug: str) -> str:
    return f"{settings.PLATFORM_HF_HUB_NAMESPACE}/{tenant_slug}-adapters"


def adapter_folder(adapter_name: str) -> str:
    """`ft:tiny-chat:acme:zebra:1a2b` → `tiny-chat--zebra--1a2b` (a folder name the Hub accepts)."""
    parts = adapter_name.split(":")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "--".join(p for i, p in enumerate(parts) if i not in (0, 2) and p))


def adapter_push_to_hub(*, adapter: Adapter, api: HfApi | None = None) -> str:
    """Upload the adapter's files to the tenant's private repository; returns `repo_id/folder`. Idempotent."""
    api = api or HfApi(token=settings.PLATFORM_HF_HUB_TOKEN)
    repo_id = tenant_repo_id(adapter.tenant.slug)
    api.create_repo(repo_id=repo_id, repo_type="model", private=True, exist_ok=True)
    folder = adapter_folder(adapter.name)
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=adapter.path, path_in_repo=folder,
                      commit_message=f"Add {adapter.name}")
    location = f"{repo_id}/{folder}"
    Adapter.objects.for_tenant(adapter.tenant_id).filter(pk=adapter.pk).update(hub_repo=location)
    return location
