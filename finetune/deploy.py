"""Publishing a tenant's adapter to the pool that serves its base model, and taking it down again.

dev / vLLM pools load adapters at runtime: each enabled backend gets `POST /v1/load_lora_adapter`, and the
adapter's name is added to that backend's `loaded_adapters` only once it answered (the gateway routes an
adapter only to backends listing it). TGI loads adapters only at start (`LORA_ADAPTERS=name=/path,…`): the
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

from finetune import selectors
from serving.models import Adapter, AdapterDeployment, Backend, BackendPool
from serving.selectors import base_models_for_tenant
from tenants.models import Tenant
from tenants.services import SYSTEM, Actor, audit_record

log = logging.getLogger(__name__)
LOAD_TIMEOUT_S = 60  # loading an adapter reads it from disk and may compile kernels on a real server


class DeployError(Exception):
    """The adapter cannot be published (no pool serves its base model)."""


def _post(url: str, body: dict) -> tuple[bool, str]:
    """POST JSON; (ok, message). The stdlib client: this runs in a view or a task, never the gateway's hot path."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=LOAD_TIMEOUT_S) as response:
            return True, response.read(500).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}: {exc.read(300).decode('utf-8', 'replace')}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"unreachable: {getattr(exc, 'reason', exc)}"


def _set_loaded(backend: Backend, name: str, loaded: bool) -> None:
    """Add or remove one adapter name on a backend, under a row lock (concurrent deploys must not lose names)."""
    with transaction.atomic():
        row = Backend.objects.select_for_update().get(pk=backend.pk)
        names = [n for n in row.loaded_adapters if n != name] + ([name] if loaded else [])
        if names != row.loaded_adapters:
            row.loaded_adapters = names
            row.save(update_fields=["loaded_adapters"])


def _tgi_env(pool: BackendPool) -> str:
    deployments = AdapterDeployment.all_tenants.filter(pool=pool).select_related("adapter").order_by("adapter__name")
    return ",".join(f"{d.adapter.name}={d.adapter.path}" for d in deployments)


def adapter_deploy(*, tenant: Tenant, adapter: Adapter, actor: Actor) -> AdapterDeployment:
    """Publish `adapter` to the tenant's pool for its base model (dedicated, else shared). Idempotent.

    Refused when the tenant may no longer use the adapter's base model (allowed models, availability).
    """
    if adapter.tenant_id != tenant.pk:
        raise ValueError(f"adapter {adapter.pk} is not tenant {tenant.pk}'s")  # callers look adapters up in the tenant
    if adapter.base_model_id not in {bm.pk for bm in base_models_for_tenant(tenant)}:
        raise DeployError(f"{adapter.base_model.name} is not available to this tenant; ask the platform team.")
    pool = selectors.pool_for_adapter(tenant, adapter.base_model)
    if pool is None:
        raise DeployError(f"No pool serves {adapter.base_model.name}; ask the platform team to add one.")
    with transaction.atomic():
        deployment, _ = AdapterDeployment.objects.for_tenant(tenant).get_or_create(adapter=adapter, pool=pool)
        audit_record(tenant=tenant, actor=actor, action="finetune.adapter_deployed", target=adapter,
                     data={"adapter": adapter.name, "pool": pool.name})
    if pool.kind == BackendPool.Kind.TGI:
        with transaction.atomic():
            BackendPool.objects.filter(pk=pool.pk).update(lora_adapters_env=_tgi_env(pool))
            for backend in pool.backends.all():  # save(), not update(): the gateway's signals must fire
                backend.needs_restart = True
                backend.save(update_fields=["needs_restart"])
            deployment.state, deployment.error = AdapterDeployment.State.PENDING, "Waiting for a rolling restart of the TGI backends."
            deployment.save(update_fields=["state", "error"])
        return deployment
    errors, loaded = [], 0
    backends = list(pool.backends.filter(enabled=True))
    for backend in backends:
        if adapter.name in backend.loaded_adapters:
            loaded += 1
            continue
        ok, message = _post(backend.url.rstrip("/") + "/v1/load_lora_adapter", {"lora_name": adapter.name, "lora_path": adapter.path})
        if ok or "already been loaded" in message:
            _set_loaded(backend, adapter.name, True)
            loaded += 1
        else:
            errors.append(f"{backend.url}: {message}")
    if not backends:
        state, error = AdapterDeployment.State.PENDING, "The pool has no enabled backends yet."
    elif errors:
        state = AdapterDeployment.State.ACTIVE if loaded else AdapterDeployment.State.FAILED
        error = f"loaded on {loaded} of {len(backends)} backends; " + "; ".join(errors)
    else:
        state, error = AdapterDeployment.State.ACTIVE, ""
    deployment.state, deployment.error = state, error[:300]
    deployment.save(update_fields=["state", "error"])
    return deployment


def backend_reload_adapters(backend: Backend) -> list[str]:
    """After a dev / vLLM backend restarted: load every adapter deployed on its pool again. Returns the names it took.

    Adapters loaded at runtime die with the server, while `loaded_adapters` still lists them: the gateway would keep
    routing them there, and a dev (or TGI-like) server answers an unknown adapter with the base model, silently.
    `loaded_adapters` becomes exactly what the backend took now; one that fails to load is logged and left out, so
    its requests get a clear 503 (`adapter_not_loaded`) instead. TGI backends load `LORA_ADAPTERS` at start: unchanged.
    """
    if backend.pool.kind == BackendPool.Kind.TGI:
        return list(backend.loaded_adapters)
    loaded = []
    for deployment in AdapterDeployment.all_tenants.filter(pool=backend.pool).select_related("adapter").order_by("adapter__name"):
        adapter = deployment.adapter
        ok, message = _post(backend.url.rstrip("/") + "/v1/load_lora_adapter", {"lora_name": adapter.name, "lora_path": adapter.path})
        if ok or "already been loaded" in message:
            loaded.append(adapter.name)
        else:
            log.warning("reloading %s on %s: %s", adapter.name, backend.url, message)
    with transaction.atomic():
        row = Backend.objects.select_for_update().get(pk=backend.pk)
        if row.loaded_adapters != loaded:
            row.loaded_adapters = loaded
            row.save(update_fields=["loaded_adapters"])  # save(): the gateway's config version moves
    return loaded


def _served_models(url: str) -> set[str] | None:
    """The model ids a dev / vLLM backend lists at /v1/models (base and loaded adapters); None if it cannot say."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=LOAD_TIMEOUT_S) as response:
            return {m["id"] for m in json.load(response)["data"]}
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        log.info("could not list the models of %s: %s", url, exc)
        return None


def backends_reconcile_adapters() -> dict[str, list[str]]:
    """Periodic (beat): a dev / vLLM backend that restarted has forgotten the adapters loaded at run time, while
    `loaded_adapters` still lists them. Every enabled one whose /v1/models lacks an adapter deployed on its pool
    gets them all loaded again (`backend_reload_adapters`). Returns {backend url: adapters it now holds} for
    the backends it reloaded. Unreachable backends are left to the health checks; TGI reloads from its env."""
    reloaded = {}
    backends = Backend.objects.filter(enabled=True).exclude(pool__kind=BackendPool.Kind.TGI).select_related("pool")
    # all_tenants: a pool's deployments belong to many tenants; they are only compared, never shown.
    deployed_on: dict[int, set[str]] = {}
    for pool_id, name in AdapterDeployment.all_tenants.filter(pool__in={b.pool_id for b in backends}).values_list("pool_id", "adapter__name"):
        deployed_on.setdefault(pool_id, set()).add(name)
    for backend in backends:
        deployed = deployed_on.get(backend.pool_id, set())
        served = _served_models(backend.url) if deployed else None
        if served is None or deployed <= served:
            continue
        log.warning("backend %s no longer serves %s (restarted?); loading the pool's adapters again",
                    backend.url, ", ".join(sorted(deployed - served)))
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
