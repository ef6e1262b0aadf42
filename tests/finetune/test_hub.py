"""Adapters go to a private Hub repository per tenant when configured (a fake Hub client: no network)."""

from __future__ import annotations

import pytest

from finetune.hub import adapter_folder, adapter_push_to_hub, hub_enabled
from serving.models import Adapter, BaseModel


class FakeHub:
    def __init__(self):
        self.calls = []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))


def test_hub_is_off_unless_token_and_namespace_are_set(settings):
    settings.PLATFORM_HF_HUB_TOKEN, settings.PLATFORM_HF_HUB_NAMESPACE = "", "acme-org"
    assert not hub_enabled()
    settings.PLATFORM_HF_HUB_TOKEN = "hf_x"
    assert hub_enabled()


def test_push_creates_a_private_repo_per_tenant_and_uploads_the_adapter(world, settings, tmp_path):
    settings.PLATFORM_HF_HUB_TOKEN, settings.PLATFORM_HF_HUB_NAMESPACE = "hf_x", "platform-org"
    (tmp_path / "adapter_config.json").write_text("{}")
    bm = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat")
    adapter = Adapter.all_tenants.create(tenant=world.tenant, name="ft:tiny-chat:acme:zebra:1a2b", base_model=bm, path=str(tmp_path))
    hub = FakeHub()
    location = adapter_push_to_hub(adapter=adapter, api=hub)
    assert location == "platform-org/acme-adapters/tiny-chat--zebra--1a2b"
    (_, create), (_, upload) = hub.calls
    assert create == {"repo_id": "platform-org/acme-adapters", "repo_type": "model", "private": True, "exist_ok": True}
    assert upload["folder_path"] == str(tmp_path) and upload["path_in_repo"] == "tiny-chat--zebra--1a2b"
    adapter.refresh_from_db()
    assert adapter.hub_repo == location


@pytest.mark.parametrize(("name", "folder"), [("ft:tiny-chat:acme:zebra:1a2b", "tiny-chat--zebra--1a2b"), ("ft:m/x:t::9", "m-x--9")])
def test_adapter_folder_names(name, folder):
    assert adapter_folder(name) == folder
