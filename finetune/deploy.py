"""Publishing a tenant's adapter to the pool that serves its base model, and taking it down again.

dev / vLLM pools load adapters at runtime: each enabled backend gets `POST /v1/load_lora_adapter`, and the
adapter's name is added to that backend's `loaded_adapters` only once it answered (the gateway routes an
adapter only to backends listing it). What a backend refused is not asked again until a change
(serving.adapter_loads: the rules shared with the gateway, which reloads what a restarted backend forgot). TGI loads adapters only at start (`LORA_ADAPTERS=name=/path,…`): the
pool's `lora_adapters_env` is rewritten, its backends are marked `needs_restart` and the deployment stays
pending until staff restart them one at a time and run "mark restarted" (`pool_mark_restarted`).

Adapter paths must be readable by the backends at the same path (STORAGE_DIR on a shared volume).
Backend and AdapterDeployment writes bump the gateway's config version (serving.signals).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

from django.db import transaction

from finetune import pools
from serving import adapter_loads
from serving.adapter_loads import post_json as _post
from serving.models import Adapter, AdapterDeployment, Backend, BackendPool
from serving.selectors import base_models_for_tenant
from tenants.models import Tenant
from tenants.services import SYSTEM, Actor, audit_record

log = logging.getLogger(__name__)
LOAD_TIMEOUT_S = adapter_loads.LOAD_TIMEOUT_S


class DeployError(Exception):
    """The adapter cannot be published (no pool serves its base model)."""


def _set_loaded(backend: Backend, name: str, loaded: bool) -> None:
    """Add or remove one adapter name on a backend, under a row lock (concurrent deploys must not lose names)."""
    if loaded:
        adapter_loads.record_backend_adapters(backend.pk, holding=[name])
    else:
        with transaction.atomic():
            row = Backend.objects.select_for_update().get(pk=backend.pk)
            names = [n for n in row.loaded_adapters if n != name]
            if names != row.loaded_adapters:
                row.loaded_adapters = names
                row.save(update_fields=["loaded_adapters"])


def _tgi_env(pool: BackendPool) -> str:
    deployments = AdapterDeployment.all_tenants.filter(pool=pool).select_related("adapter").order_by("adapter__name")
    return ",".join(f"{d.adapter.name}={d.adapter.path}" for d in deployments if not adapter_loads.rank_refusal(d.adapter, pool))


def adapter_deploy(*, tenant: Tenant, adapter: Adapter, actor: Actor) -> AdapterDeployment:
    """Publish `adapter` to the tenant's pool for its base model (dedicated, else shared). Idempotent; deploying again
    is the tenant's retry: backends that refused it before are asked again.

    Refused when the tenant may no longer use the adapter's base model (allowed models, availability). An adapter of a
    rank above the pool's `max_lora_rank` is not sent to any backend: the deployment fails at once, saying so.
    """
    if adapter.tenant_id != tenant.pk:
        raise ValueError(f"adapter {adapter.pk} is not tenant {tenant.pk}'s")  # callers look adapters up in the tenant
    if adapter.base_model_id not in {bm.pk for bm in base_models_for_tenant(tenant)}:
        raise DeployError(f"{adapter.base_model.name} is not available to this tenant; ask the platform team.")
    pool = pools.pool_for_adapter(tenant, adapter.base_model)
    if pool is None:
        raise DeployError(f"No pool serves {adapter.base_model.name}; ask the platform team to add one.")
    with transaction.atomic():
        deployment, _ = AdapterDeployment.objects.for_tenant(tenant).get_or_create(adapter=adapter, pool=pool)
        audit_record(tenant=tenant, actor=actor, action="finetune.adapter_deployed", target=adapter,
                     data={"adapter": adapter.name, "pool": pool.name})
    refusal = adapter_loads.rank_refusal(adapter, pool)
    if pool.kind == BackendPool.Kind.TGI:
        with transaction.atomic():
            BackendPool.objects.filter(pk=pool.pk).update(lora_adapters_env=_tgi_env(pool))
            if refusal:
                deployment.state, deployment.error = AdapterDeployment.State.FAILED, refusal
            else:
                for backend in pool.backends.all():  # save(), not update(): the gateway's signals must fire
                    backend.needs_restart = True
                    backend.save(update_fields=["needs_restart"])
                deployment.state, deployment.error = AdapterDeployment.State.PENDING, "Waiting for a rolling restart of the TGI backends."
            deployment.save(update_fields=["state", "error"])
        return deployment
    adapter_loads.deployment_load(deployment, retry=True)
    deployment.refresh_from_db()
    return deployment


def backend_reload_adapters(backend: Backend) -> list[str]:
    """After a dev / vLLM backend restarted: load every adapter deployed on its pool again. Returns the names it took.

    Adapters loaded at runtime die with the server, while `loaded_adapters` still lists them: the gateway would keep
    routing them there, and a dev (or TGI-like) server answers an unknown adapter with the base model, silently.
    `loaded_adapters` becomes exactly what the backend took now; one it refuses is recorded in its deployment's
    `failed_on` (not asked again until a change) and left out, so its requests get a clear 503 (`adapter_not_loaded`)
    or go to another backend. TGI backends load `LORA_ADAPTERS` at start: unchanged.
    """
    if backend.pool.kind == BackendPool.Kind.TGI:
        return list(backend.loaded_adapters)
    return adapter_loads.backend_reload(backend)


def _served_models(url: str) -> set[str] | None:
    """The model ids a dev / vLLM backend lists at /v1/models (base and loaded adapters); None if it cannot say."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=LOAD_TIMEOUT_S) as response:
            return {m["id"] for m in json.load(response)["data"]}
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        log.info("could not list the models of %s: %s", url, exc)
        return None


def _forget_disabled_refusals() -> None:
    """A backend that refused an adapter is asked again only after a change: once it is disabled (or deleted), its
    refusals are forgotten, so enabling it again retries them."""
    enabled = set(Backend.objects.filter(enabled=True).values_list("pk", flat=True))
    # all_tenants: staff-side maintenance across every tenant's deployments; only `failed_on` is touched.
    for deployment in AdapterDeployment.all_tenants.exclude(failed_on=[]).select_related("adapter", "pool"):
        kept = [b for b in deployment.failed_on if b in enabled]
        if kept != deployment.failed_on:
            deployment.failed_on = kept
            adapter_loads.deployment_refresh(deployment, changed=True)


def backends_reconcile_adapters() -> dict[str, list[str]]:
    """Periodic (beat): a dev / vLLM backend that restarted has forgotten the adapters loaded at run time, while
    `loaded_adapters` still lists them; a backend added to a pool (or enabled again) holds none of its deployments yet.
    Every enabled one whose /v1/models lacks an adapter it should hold (`adapter_loads.adapters_expected`: not one it
    refused before, nor one of a rank its pool does not serve) gets them loaded (`backend_reload_adapters`).
    Returns {backend url: adapters it now holds} for the backends it reloaded. Unreachable backends are left to the
    health checks; TGI reloads from its env. A refused adapter is never asked again here: no retry every minute."""
    _forget_disabled_refusals()
    reloaded = {}
    for backend in Backend.objects.filter(enabled=True).exclude(pool__kind=BackendPool.Kind.TGI).select_related("pool"):
        expected = {load.name for load in adapter_loads.adapters_expected(backend)}
        served = _served_models(backend.url) if expected else None
        if served is None or expected <= served:
            continue
        log.warning("backend %s does not serve %s (restarted, or new to its pool); loading its adapters",
                    backend.url, ", ".join(sorted(expected - served)))
        reloaded[backend.url] = backend_reload_adapters(backend)
    return reloaded


def adapter_undeploy(*, tenant: Tenant, adapter: Adapter, actor: Actor) -> list[str]:
    """Take an adapter off every pool: unlisted first (no new requests are routed to it), then unloaded."""
    removed = []
    for deployment in AdapterDeployment.objects.for_tenant(tenant).filter(adapter=adapter).select_related("pool"):
        pool = deployment.pool
        backends = list(pool.backends.all())
        for backend in backends:
            _set_loaded(backend, adapter.name, False)
        with transaction.atomic():
            deployment.delete()
            audit_record(tenant=tenant, actor=actor, action="finetune.adapter_undeployed", target=adapter,
                         data={"adapter": adapter.name, "pool": pool.name})
        if pool.kind == BackendPool.Kind.TGI:
            BackendPool.objects.filter(pk=pool.pk).update(lora_adapters_env=_tgi_env(pool))
            for backend in backends:
                backend.needs_restart = True
                backend.save(update_fields=["needs_restart"])
        else:
            for backend in backends:
                if backend.enabled:
                    ok, message = _post(backend.url.rstrip("/") + "/v1/unload_lora_adapter", {"lora_name": adapter.name})
                    if not ok:
                        log.warning("unloading %s from %s: %s", adapter.name, backend.url, message)
        removed.append(pool.name)
    return removed


@transaction.atomic
def pool_mark_restarted(*, pool: BackendPool, actor: Actor = SYSTEM) -> None:
    """Staff, after a rolling restart of a TGI pool with the new LORA_ADAPTERS: its backends serve exactly those."""
    names = [item.split("=", 1)[0] for item in pool.lora_adapters_env.split(",") if "=" in item]
    for backend in pool.backends.all():
        backend.loaded_adapters, backend.needs_restart = names, False
        backend.save(update_fields=["loaded_adapters", "needs_restart"])
    for deployment in AdapterDeployment.all_tenants.filter(pool=pool).select_related("adapter", "tenant"):
        if deployment.adapter.name in names and deployment.state != AdapterDeployment.State.ACTIVE:
            deployment.state, deployment.error = AdapterDeployment.State.ACTIVE, ""
            deployment.save(update_fields=["state", "error"])
            audit_record(tenant=deployment.tenant, actor=actor, action="finetune.adapter_active", target=deployment.adapter,
                         data={"adapter": deployment.adapter.name, "pool": pool.name})
