"""Deployment to dev / vLLM pools when a backend refuses an adapter: failed stays failed, with its reason, and is
asked again only on a change (a new or re-enabled backend, the tenant deploying again, staff's retry)."""

from __future__ import annotations

import pytest

from finetune import deploy
from finetune.tasks import reconcile_adapters
from serving import adapter_loads
from serving.models import Adapter, AdapterDeployment, Backend, BackendPool, BaseModel
from tenants.services import SYSTEM
from tests.support.vllm_fake import FakeVLLM

RANK_REFUSAL = (500, "Call to add_lora method failed: Worker failed with error 'LoRA rank 32 is greater than max_lora_rank 16.', "
                     "please check the stack trace above for the root cause")


@pytest.fixture
def fakes():
    started = []

    def start() -> FakeVLLM:
        started.append(FakeVLLM())
        return started[-1]

    yield start
    for fake in started:
        fake.stop()


@pytest.fixture
def setup(world, fakes):
    """A vLLM pool (max rank 16) with one backend that refuses the tenant's adapter as vLLM refuses a rank it cannot hold."""
    fake = fakes()
    base = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat")
    pool = BackendPool.objects.create(name="vllm-tiny", base_model=base, kind="vllm", max_lora_rank=16)
    backend = Backend.objects.create(pool=pool, url=fake.url)
    adapter = Adapter.all_tenants.create(tenant=world.tenant, name="ft:tiny-chat:acme:big:1", base_model=base, path="/a/big", rank=8)
    fake.refuse[adapter.name] = RANK_REFUSAL
    return fake, pool, backend, adapter


def _deployment(adapter) -> AdapterDeployment:
    return AdapterDeployment.all_tenants.get(adapter=adapter)


def test_a_refused_deployment_stays_failed_and_is_not_retried_every_minute(world, setup):
    fake, pool, backend, adapter = setup
    assert deploy.adapter_deploy(tenant=world.tenant, adapter=adapter, actor=SYSTEM).state == "failed"
    assert fake.loads[adapter.name] == 1
    for _ in range(3):  # beat's reconcile, minute after minute
        assert reconcile_adapters() == 0
    assert fake.loads[adapter.name] == 1  # asked once, not every minute
    deployment = _deployment(adapter)
    assert deployment.state == "failed" and deployment.failed_on == [backend.pk]
    assert "No backend of the vllm-tiny pool could load this adapter" in deployment.error  # the tenant's reason
    assert fake.url not in deployment.error and "max_lora_rank" not in deployment.error  # not the backend's words
    assert fake.url in deployment.error_detail and "LoRA rank 32 is greater than max_lora_rank 16" in deployment.error_detail  # staff's


def test_a_new_backend_is_a_change_that_retries_it_once(world, setup, fakes):
    fake, pool, backend, adapter = setup
    deploy.adapter_deploy(tenant=world.tenant, adapter=adapter, actor=SYSTEM)
    second = fakes()
    Backend.objects.create(pool=pool, url=second.url)
    assert reconcile_adapters() == 1
    assert second.loads[adapter.name] == 1 and adapter.name in second.loaded and fake.loads[adapter.name] == 1
    deployment = _deployment(adapter)
    assert deployment.state == "active" and deployment.error == "Loaded on 1 of 2 backends; 1 refused it."
    assert reconcile_adapters() == 0 and fake.loads[adapter.name] == 1  # still never asked again where it was refused


def test_a_backend_enabled_again_is_asked_again(world, setup):
    fake, pool, backend, adapter = setup
    deploy.adapter_deploy(tenant=world.tenant, adapter=adapter, actor=SYSTEM)
    Backend.objects.filter(pk=backend.pk).update(enabled=False)
    reconcile_adapters()
    assert _deployment(adapter).failed_on == []
    del fake.refuse[adapter.name]  # restarted with a higher --max-lora-rank meanwhile
    Backend.objects.filter(pk=backend.pk).update(enabled=True)
    assert reconcile_adapters() == 1
    assert fake.loads[adapter.name] == 2 and _deployment(adapter).state == "active"
    assert Backend.objects.get(pk=backend.pk).loaded_adapters == [adapter.name]


def test_staff_retry_and_deploying_again_ask_the_refusing_backend_again(world, setup):
    fake, pool, backend, adapter = setup
    deploy.adapter_deploy(tenant=world.tenant, adapter=adapter, actor=SYSTEM)
    adapter_loads.deployment_retry(deployment=_deployment(adapter), actor=SYSTEM)
    assert _deployment(adapter).state == "failed"
    assert fake.loads[adapter.name] == 2
    del fake.refuse[adapter.name]
    assert deploy.adapter_deploy(tenant=world.tenant, adapter=adapter, actor=SYSTEM).state == "active"
    assert fake.loads[adapter.name] == 3
    deployment = _deployment(adapter)
    assert (deployment.error, deployment.failed_on, deployment.error_detail) == ("", [], "")


def test_a_rank_above_the_pools_maximum_fails_at_once_with_the_reason_and_is_never_sent(world, setup):
    fake, pool, backend, adapter = setup
    Adapter.all_tenants.filter(pk=adapter.pk).update(rank=32)
    adapter.refresh_from_db()
    deployment = deploy.adapter_deploy(tenant=world.tenant, adapter=adapter, actor=SYSTEM)
    assert deployment.state == "failed"
    assert deployment.error == ("Rank 32 is above the highest LoRA rank the vllm-tiny pool serves (16); fine-tune again with "
                                "a rank of at most 16.")
    assert reconcile_adapters() == 0
    assert fake.loads[adapter.name] == 0
    BackendPool.objects.filter(pk=pool.pk).update(max_lora_rank=32)  # staff raised the pool's maximum: a change
    del fake.refuse[adapter.name]
    assert reconcile_adapters() == 1
    assert fake.loads[adapter.name] == 1 and _deployment(adapter).state == "active"


def test_staff_see_why_in_the_admin_and_retry_from_it(world, setup, admin_client):
    fake, pool, backend, adapter = setup
    deploy.adapter_deploy(tenant=world.tenant, adapter=adapter, actor=SYSTEM)
    deployment = _deployment(adapter)
    page = admin_client.get(f"/admin/serving/adapterdeployment/{deployment.pk}/change/").content.decode()
    assert "LoRA rank 32 is greater than max_lora_rank 16" in page  # the backend's answer, for staff
    del fake.refuse[adapter.name]
    r = admin_client.post("/admin/serving/adapterdeployment/", {"action": "retry_deployments", "_selected_action": [deployment.pk]},
                          follow=True)
    notes = [str(m) for m in r.context["messages"]]
    assert r.status_code == 200 and notes == ["ft:tiny-chat:acme:big:1 on vllm-tiny: Active."], notes
    assert fake.loads[adapter.name] == 2 and _deployment(adapter).state == "active"


def test_enabling_a_backend_in_the_admin_forgets_its_refusals(world, setup, admin_client):
    fake, pool, backend, adapter = setup
    deploy.adapter_deploy(tenant=world.tenant, adapter=adapter, actor=SYSTEM)
    Backend.objects.filter(pk=backend.pk).update(enabled=False)
    form = {"pool": pool.pk, "url": backend.url, "max_concurrency": 16, "enabled": "on", "loaded_adapters": "[]"}
    r = admin_client.post(f"/admin/serving/backend/{backend.pk}/change/", form)
    assert r.status_code == 302, r.content.decode()[:2000]
    assert _deployment(adapter).failed_on == []  # the next reconcile asks it again
    del fake.refuse[adapter.name]
    assert reconcile_adapters() == 1 and _deployment(adapter).state == "active"
