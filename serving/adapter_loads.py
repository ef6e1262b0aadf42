"""Which adapters a dev / vLLM backend should hold, and the record of what it answered when asked to load them.

Runtime loading (`POST /v1/load_lora_adapter`) is asked for by `finetune.deploy` (deploy, reload after a restart,
beat's reconcile: stdlib HTTP) and by the gateway's health monitor (a backend that forgot an adapter: aiohttp, off
the request path); both decide and record through here, so a refusal is handled one way:

- A backend that **refused** an adapter (an HTTP error: vLLM's 500 for a rank above its `--max-lora-rank`, a missing
  file, …) is noted in the deployment's `failed_on` and never asked again for it, until a change: the backend
  disabled and enabled again, the tenant deploying again, or staff's "Retry deployment". An unreachable backend
  refused nothing: it is asked again when it is back.
- An adapter of a rank above the pool's `max_lora_rank` is not sent to its backends at all.
- `error` says why in the platform's words (the tenant sees it); `error_detail` keeps the backends' answers, with
  their addresses, for staff.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass

from django.db import transaction

log = logging.getLogger(__name__)
LOAD_TIMEOUT_S = 60  # loading an adapter reads it from disk and may compile kernels on a real server

RUNTIME_KINDS = ("dev", "vllm")  # pools whose backends load adapters at run time (TGI: at start, LORA_ADAPTERS)
ALREADY_LOADED = "already been loaded"  # vLLM's (and the dev backend's) answer to a second load: it holds it


@dataclass(frozen=True, slots=True)
class AdapterLoad:
    name: str
    path: str


def rank_refusal(adapter, pool) -> str:
    """The tenant-facing reason an adapter's rank does not fit a pool, or "" when it fits."""
    if adapter.rank <= pool.max_lora_rank:
        return ""
    return (f"Rank {adapter.rank} is above the highest LoRA rank the {pool.name} pool serves ({pool.max_lora_rank}); "
            f"fine-tune again with a rank of at most {pool.max_lora_rank}.")


def adapters_expected(backend) -> list[AdapterLoad]:
    """The adapters `backend` should hold: deployed on its pool, of a rank the pool serves, not refused by it before."""
    from serving.models import AdapterDeployment

    pool = backend.pool
    if pool.kind not in RUNTIME_KINDS or not backend.enabled:
        return []
    # all_tenants: a pool's deployments belong to many tenants; only their names and paths go to the backend.
    deployments = AdapterDeployment.all_tenants.filter(pool=pool).select_related("adapter").order_by("adapter__name")
    return [AdapterLoad(d.adapter.name, d.adapter.path) for d in deployments
            if backend.pk not in (d.failed_on or ()) and not rank_refusal(d.adapter, pool)]


def load_outcome(ok: bool, message: str) -> str:
    """"loaded", "refused" or "unreachable" from a load request's result (`ok`, the answer or the error)."""
    if ok or ALREADY_LOADED in message:
        return "loaded"
    return "refused" if message.startswith("HTTP ") else "unreachable"


@transaction.atomic
def record_backend_adapters(backend_id: int, *, holding=(), dropped=(), refused: dict[str, str] | None = None) -> list[str]:
    """What a backend holds now: names in `holding` join its `loaded_adapters`, names in `dropped` and `refused`
    ({name: the backend's answer}) leave it, and every deployment concerned gets its state again (`deployment_refresh`).
    Row-locked and merged, so a concurrent deploy's name is not lost; saved with save() so gateways reload their
    snapshot. Returns the backend's `loaded_adapters`."""
    from serving.models import AdapterDeployment, Backend

    refused = refused or {}
    row = Backend.objects.select_for_update().select_related("pool").get(pk=backend_id)
    leaving = set(dropped) | set(refused)
    names = [n for n in row.loaded_adapters if n not in leaving]
    names += [n for n in dict.fromkeys(holding) if n not in names and n not in leaving]
    if names != row.loaded_adapters:
        row.loaded_adapters = names
        row.save(update_fields=["loaded_adapters"])
    concerned = set(holding) | leaving
    if concerned:
        for deployment in (AdapterDeployment.all_tenants.select_for_update().filter(pool_id=row.pool_id, adapter__name__in=concerned)
                           .select_related("adapter", "pool")):
            before = (list(deployment.failed_on), deployment.error_detail)
            if deployment.adapter.name in refused:
                if row.pk not in deployment.failed_on:
                    deployment.failed_on = [*deployment.failed_on, row.pk]
                deployment.error_detail = f"{row.url}: {refused[deployment.adapter.name]}"[:2000]
            elif deployment.adapter.name in holding and row.pk in deployment.failed_on:
                deployment.failed_on = [b for b in deployment.failed_on if b != row.pk]
            deployment_refresh(deployment, changed=before != (deployment.failed_on, deployment.error_detail))
    return names


def deployment_refresh(deployment, *, changed: bool = False) -> None:
    """Set a dev / vLLM deployment's state and tenant-facing `error` from its pool's enabled backends: active when one
    holds it, failed when the rank does not fit or every backend refused it, pending otherwise. Saves when that changed
    or `changed` (the caller changed other fields)."""
    from serving.models import AdapterDeployment

    pool, name = deployment.pool, deployment.adapter.name
    if pool.kind not in RUNTIME_KINDS:
        return
    backends = [b for b in pool.backends.all() if b.enabled]
    holders = [b for b in backends if name in b.loaded_adapters]
    refusing = [b for b in backends if b.pk in deployment.failed_on and b not in holders]
    state, error = AdapterDeployment.State.PENDING, ""
    if rank_refusal(deployment.adapter, pool):
        state, error = AdapterDeployment.State.FAILED, rank_refusal(deployment.adapter, pool)
    elif not backends:
        error = "The pool has no enabled backends yet; it loads when one is added."
    elif holders:
        state = AdapterDeployment.State.ACTIVE
        if len(holders) < len(backends):
            error = f"Loaded on {len(holders)} of {len(backends)} backends" + (f"; {len(refusing)} refused it." if refusing else ".")
    elif len(refusing) == len(backends):
        state = AdapterDeployment.State.FAILED
        error = (f"No backend of the {pool.name} pool could load this adapter. It is not retried until a backend is added "
                 "or enabled again, or you deploy it again; the platform team has the backends' answers.")
    else:
        error = "Waiting for the pool's backends to be reachable; it loads when they are."
    if changed or (state, error[:300]) != (deployment.state, deployment.error):
        deployment.state, deployment.error = state, error[:300]
        deployment.save(update_fields=["state", "error", "error_detail", "failed_on"])


# ---- loading from a view, a task or a command (stdlib HTTP; the gateway uses aiohttp, serving.health) ----------------


def post_json(url: str, body: dict) -> tuple[bool, str]:
    """POST JSON; (ok, the answer or "HTTP <status>: <answer>" or "unreachable: <reason>"). Never on the gateway's hot path."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=LOAD_TIMEOUT_S) as response:
            return True, response.read(500).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}: {exc.read(300).decode('utf-8', 'replace')}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"unreachable: {getattr(exc, 'reason', exc)}"


def load_request(backend, load: AdapterLoad) -> tuple[str, str]:
    """Ask one backend to load one adapter: ("loaded" | "refused" | "unreachable", the answer)."""
    ok, message = post_json(backend.url.rstrip("/") + "/v1/load_lora_adapter", {"lora_name": load.name, "lora_path": load.path})
    outcome = load_outcome(ok, message)
    if outcome != "loaded":
        log.warning("loading adapter %s on %s: %s", load.name, backend.url, message)
    return outcome, message


def deployment_load(deployment, *, retry: bool) -> None:
    """Load a dev / vLLM deployment on every enabled backend of its pool that should hold it and does not list it.
    `retry`: an explicit action (the tenant deploying again, staff's "Retry deployment"), so backends that refused it
    before are asked again. The deployment's state is refreshed afterwards."""
    pool, adapter = deployment.pool, deployment.adapter
    if pool.kind not in RUNTIME_KINDS:
        return
    if retry and (deployment.failed_on or deployment.error_detail):
        deployment.failed_on, deployment.error_detail = [], ""
        deployment.save(update_fields=["failed_on", "error_detail"])
    load = AdapterLoad(adapter.name, adapter.path)
    if not rank_refusal(adapter, pool):
        for backend in pool.backends.filter(enabled=True).order_by("id"):
            if adapter.name in backend.loaded_adapters or backend.pk in deployment.failed_on:
                continue
            outcome, message = load_request(backend, load)
            if outcome == "loaded":
                record_backend_adapters(backend.pk, holding=[adapter.name])
            elif outcome == "refused":
                record_backend_adapters(backend.pk, refused={adapter.name: message})
            deployment.refresh_from_db()
    deployment_refresh(deployment)


def backend_reload(backend) -> list[str]:
    """A dev / vLLM backend (re)started, or forgot adapters: ask it for every adapter it should hold; `loaded_adapters`
    becomes what it took (what it refused goes to the deployments' `failed_on`). Returns its `loaded_adapters`."""
    holding, refused = [], {}
    for load in adapters_expected(backend):
        outcome, message = load_request(backend, load)
        if outcome == "loaded":
            holding.append(load.name)
        elif outcome == "refused":
            refused[load.name] = message
    return record_backend_adapters(backend.pk, holding=holding, refused=refused,
                                   dropped=[n for n in backend.loaded_adapters if n not in holding])


def deployment_retry(*, deployment, actor) -> None:
    """Staff's "Retry deployment" (admin): ask every enabled backend of a dev / vLLM pool again, those that refused it
    included. Audited in the tenant's log."""
    from tenants.services import audit_record

    audit_record(tenant=deployment.tenant, actor=actor, action="finetune.adapter_deploy_retried", target=deployment.adapter,
                 data={"adapter": deployment.adapter.name, "pool": deployment.pool.name})
    deployment_load(deployment, retry=True)


def backend_refusals_forget(backend) -> None:
    """A backend enabled again (or restarted with other settings) is a change: what it refused is asked of it again
    (by beat's reconcile, or the gateway's health monitor)."""
    from serving.models import AdapterDeployment

    # all_tenants: staff-side maintenance of one pool's deployments; only `failed_on` is touched.
    for deployment in AdapterDeployment.all_tenants.filter(pool_id=backend.pool_id).exclude(failed_on=[]).select_related("adapter", "pool"):
        if backend.pk in deployment.failed_on:
            deployment.failed_on = [b for b in deployment.failed_on if b != backend.pk]
            deployment_refresh(deployment, changed=True)
