"""Bring your own adapter against real vLLM: what finetune/byo.py accepts, vLLM loads and serves; what it refuses for
the pool's rank never reaches the server."""

from __future__ import annotations

import io
import tarfile

from django.core.files.uploadedfile import SimpleUploadedFile
from openai import OpenAI
from rest_framework.test import APIClient

from finetune import deploy
from serving.models import Adapter
from tenants import services as tenant_services
from tenants.services import SYSTEM, Actor
from tests.realvllm.server import served_models
from tests.support.gateway import wait_for

PROMPT = "the cat sees"


def _archive(folder) -> SimpleUploadedFile:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(folder, arcname="adapter")  # what `tar czf adapter.tgz adapter/` makes
    return SimpleUploadedFile("adapter.tgz", buffer.getvalue())


def test_an_uploaded_peft_adapter_is_served_by_vllm_and_a_rank_above_the_pool_is_refused_before_it(
        world, platform, random_adapter, settings, tmp_path):
    settings.STORAGE_DIR = tmp_path / "storage"  # the server reads uploaded adapters from here (same machine)
    vllm, gw = platform["vllm"], platform["start"]()
    _, secret = tenant_services.api_key_create(tenant=world.tenant, name="byo", scopes=["finetune"],
                                               actor=Actor(user=world.owner))
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    before = served_models(vllm.url)

    refused = api.post("/v1/adapters", {"file": [_archive(random_adapter[32])], "model": "tiny-chat"}, format="multipart")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "rank_not_served", refused.content
    assert "rank 32 is above the highest LoRA rank your pool for tiny-chat serves (16)" in refused.json()["error"]["message"]
    assert served_models(vllm.url) == before and not Adapter.objects.for_tenant(world.tenant).exists()

    accepted = api.post("/v1/adapters", {"file": [_archive(random_adapter[4])], "model": "tiny-chat"}, format="multipart")
    assert accepted.status_code == 201, accepted.content
    name = accepted.json()["id"]
    assert accepted.json()["deployments"] == [{"pool": "vllm-tiny", "state": "active", "error": ""}]
    assert name in served_models(vllm.url)  # vLLM loaded the stored files: POST /v1/load_lora_adapter

    direct = OpenAI(base_url=f"{vllm.url}/v1", api_key="unused", max_retries=0)
    theirs = direct.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    base = direct.completions.create(model=vllm.model, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    acme = OpenAI(base_url=f"{gw.url}/v1", api_key=platform["keys"]["acme"], max_retries=0)
    assert wait_for(lambda: any(m.id == name for m in acme.models.list().data))
    ours = acme.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    assert ours == theirs != base

    deploy.adapter_undeploy(tenant=world.tenant, adapter=Adapter.objects.for_tenant(world.tenant).get(name=name),
                            actor=SYSTEM)
    assert name not in served_models(vllm.url)
