"""Adapter versions and canary rollout: a model name a tenant calls, the version serving it, and a new version taking a
chosen share of its requests until it is promoted or rolled back (docs/finetuning.md, "Versions and canary rollout").

A rollout (serving.models.AdapterRollout) is created the first time a canary is started for one of the tenant's
adapters (its name is that adapter's ft: name, its current version that adapter), or by naming a version with a
tenant-chosen name (`rollout_create`: "support-bot" → an adapter). Both versions are the tenant's own
adapters on the same base model, the canary deployed. The gateway splits the name's requests
(serving.gateway.plan.pick_version) from its next configuration snapshot: every change here records an audit event,
which bumps the config version (serving.signals), so a rollback is effective within the gateway's poll interval.
The ledger's `adapter` names the version that served each request: `comparison` reads the two versions' figures from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from django.db import transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from serving.models import Adapter, AdapterDeployment, AdapterRollout, BaseModel, UsageRecord
from tenants.models import Tenant
from tenants.services import Actor, audit_record


# A tenant-chosen name: no colon, so never an adapter's `ft:` name; the gateway's placeholder names are refused.
ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")
RESERVED_NAMES = {"default", "tgi", "dummy"}


class RolloutError(Exception):
    """A rollout change that cannot be made; `status` is the HTTP status the API answers (404: not the tenant's)."""

    def __init__(self, message: str, *, status: int = 409, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


def _adapter(tenant: Tenant, ref, param: str = "canary") -> Adapter:
    """One of the tenant's adapters, by id or model name; another tenant's (or none) is a 404."""
    qs = Adapter.objects.for_tenant(tenant).select_related("base_model")
    adapter = qs.filter(pk=int(ref)).first() if str(ref).isdigit() else qs.filter(name=str(ref)).first()
    if adapter is None:
        raise RolloutError(f"No adapter {ref!r} in this tenant.", status=404, param=param)
    return adapter


def rollout_get(tenant: Tenant, ref) -> AdapterRollout:
    """The tenant's rollout by id or model name; another tenant's is a 404."""
    qs = AdapterRollout.objects.for_tenant(tenant).select_related("current", "canary")
    rollout = qs.filter(pk=int(ref)).first() if str(ref).isdigit() else qs.filter(name=str(ref)).first()
    if rollout is None:
        raise RolloutError(f"No rollout {ref!r} in this tenant.", status=404)
    return rollout


def _routable(tenant: Tenant, adapter: Adapter) -> bool:
    return AdapterDeployment.objects.for_tenant(tenant).filter(adapter=adapter).exclude(
        state=AdapterDeployment.State.FAILED).exists()


def _share(rollout: AdapterRollout) -> int:
    """The canary's share as routed: 0 once its adapter is gone (deleted: the row's canary is null, its percent kept)."""
    return rollout.canary_percent if rollout.canary_id else 0


def _data(rollout: AdapterRollout, **extra) -> dict:
    return {"model": rollout.name, "current": rollout.current.name,
            "canary": rollout.canary.name if rollout.canary_id else None, "canary_percent": _share(rollout), **extra}


def rollout_create(*, tenant: Tenant, actor: Actor, name: str, current) -> AdapterRollout:
    """A tenant-chosen model name (`name`, e.g. "support-bot") served by `current` (one of its adapters, by id or
    name); canaries then split it as any rollout. Refused: a name that is not 1-64 letters, digits, '.', '_' or '-'
    (starting with a letter or digit), a base model's name, a placeholder, or one of the tenant's rollouts already."""
    if not isinstance(name, str) or not ALIAS_RE.match(name) or name.lower() in RESERVED_NAMES:
        raise RolloutError("The name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
                           "(and not 'default', 'tgi' or 'dummy').", status=400, param="model")
    if BaseModel.objects.filter(name__iexact=name).exists():
        raise RolloutError(f"{name} is a base model's name.", status=400, param="model")
    adapter = _adapter(tenant, current, "current")
    with transaction.atomic():
        if AdapterRollout.objects.for_tenant(tenant).filter(name=name).exists():
            raise RolloutError(f"{name} already names a version: start a canary on it, or promote one.", param="model")
        rollout = AdapterRollout.objects.for_tenant(tenant).create(tenant=tenant, name=name, current=adapter)
        audit_record(tenant=tenant, actor=actor, action="finetune.rollout_created", target=rollout, data=_data(rollout))
    return rollout


def canary_start(*, tenant: Tenant, actor: Actor, model: str, canary, percent) -> AdapterRollout:
    """Give `canary` (an adapter id or name) `percent` % of the requests naming `model` (a rollout's name, or one of
    the tenant's adapter names: its rollout is created, that adapter current). Starting the same canary again changes
    its share (`finetune.canary_changed`); another canary replaces the running one and restarts the comparison."""
    try:
        percent = int(percent)
    except (TypeError, ValueError):
        raise RolloutError("percent must be a whole number from 1 to 100.", status=400, param="percent") from None
    if not 1 <= percent <= 100:
        raise RolloutError("percent must be a whole number from 1 to 100 (0: roll back).", status=400, param="percent")
    new = _adapter(tenant, canary)
    with transaction.atomic():
        rollout = AdapterRollout.objects.for_tenant(tenant).select_for_update().filter(name=model).first()
        if rollout is None:
            current = Adapter.objects.for_tenant(tenant).filter(name=model).first()
            if current is None:
                raise RolloutError(f"No model {model!r} in this tenant: name one of its adapters.", status=404, param="model")
            rollout = AdapterRollout(tenant=tenant, name=model, current=current)
        current = rollout.current
        if new.pk == current.pk:
            raise RolloutError(f"{new.name} already serves {model}.", status=400, param="canary")
        if new.base_model_id != current.base_model_id:
            raise RolloutError(f"{new.name} is for {new.base_model.name}, {model} for {current.base_model.name}: a canary "
                               "must be on the same base model.", status=400, param="canary")
        if not _routable(tenant, new):
            raise RolloutError(f"Deploy {new.name} first: a canary must be deployed to take requests.", param="canary")
        action = "finetune.canary_changed" if rollout.pk and rollout.canary_id == new.pk else "finetune.canary_started"
        if action == "finetune.canary_started":
            rollout.canary_started_at = timezone.now()
        before = rollout.canary_percent if rollout.pk else 0
        rollout.canary, rollout.canary_percent = new, percent
        rollout.save()
        audit_record(tenant=tenant, actor=actor, action=action, target=rollout, data=_data(rollout, previous_percent=before))
    return rollout


def canary_promote(*, tenant: Tenant, actor: Actor, rollout: AdapterRollout) -> AdapterRollout:
    """The canary becomes the current version: 100 % of the name's requests, in one step."""
    with transaction.atomic():
        rollout = AdapterRollout.objects.for_tenant(tenant).select_for_update(of=("self",)).select_related("current", "canary").get(pk=rollout.pk)
        if rollout.canary_id is None:
            raise RolloutError(f"{rollout.name} has no canary to promote.")
        previous = rollout.current.name
        rollout.current, rollout.canary, rollout.canary_percent = rollout.canary, None, 0
        rollout.save()
        audit_record(tenant=tenant, actor=actor, action="finetune.canary_promoted", target=rollout,
                     data=_data(rollout, previous=previous))
    return rollout


def canary_rollback(*, tenant: Tenant, actor: Actor, rollout: AdapterRollout) -> AdapterRollout:
    """Drop the canary: the current version serves 100 % of the name's requests again, in one step."""
    with transaction.atomic():
        rollout = AdapterRollout.objects.for_tenant(tenant).select_for_update(of=("self",)).select_related("current", "canary").get(pk=rollout.pk)
        if rollout.canary_id is None:
            raise RolloutError(f"{rollout.name} has no canary to roll back.")
        dropped = rollout.canary.name
        rollout.canary, rollout.canary_percent = None, 0
        rollout.save()
        audit_record(tenant=tenant, actor=actor, action="finetune.canary_rolled_back", target=rollout,
                     data=_data(rollout, dropped=dropped))
    return rollout


@dataclass(frozen=True)
class VersionFigures:
    """One version's figures from the ledger over the canary's life."""

    role: str  # "current" / "canary"
    adapter: str
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    p50_ms: int | None
    p95_ms: int | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def as_dict(self) -> dict:
        return {"role": self.role, "adapter": self.adapter, "requests": self.requests, "errors": self.errors,
                "error_rate": self.error_rate, "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "p50_ms": self.p50_ms, "p95_ms": self.p95_ms}


def _percentile(rows, count: int, q: float) -> int | None:
    """The nearest-rank percentile of the rows' duration_ms, read by the database (one row fetched)."""
    if not count:
        return None
    rank = max(1, -(-count * int(q * 100) // 100))  # ceil(count · q), exact in integers
    return rows.order_by("duration_ms").values_list("duration_ms", flat=True)[rank - 1]


def comparison(rollout: AdapterRollout) -> list[VersionFigures]:
    """The current version's and the canary's figures (requests, errors = any status but ok, tokens, p50 / p95 of
    duration) for the requests naming the rollout since its canary started (all of them when none ever did). After a
    promotion or a rollback it still shows the last canary's window, with the version that was dropped gone."""
    versions = [("current", rollout.current)] + ([("canary", rollout.canary)] if rollout.canary_id else [])
    base = UsageRecord.objects.for_tenant(rollout.tenant_id).filter(model=rollout.name)
    if rollout.canary_started_at is not None:
        base = base.filter(created_at__gte=rollout.canary_started_at)
    figures = []
    for role, adapter in versions:
        rows = base.filter(adapter=adapter.name)
        agg = rows.aggregate(n=Count("id"), errors=Count("id", filter=~Q(status=UsageRecord.Status.OK)),
                             tin=Sum("input_tokens"), tout=Sum("output_tokens"))
        figures.append(VersionFigures(role, adapter.name, agg["n"], agg["errors"], agg["tin"] or 0, agg["tout"] or 0,
                                      _percentile(rows, agg["n"], 0.50), _percentile(rows, agg["n"], 0.95)))
    return figures


def rollout_dict(rollout: AdapterRollout, *, with_figures: bool = True) -> dict:
    out = {"id": rollout.pk, "model": rollout.name, "current": rollout.current.name,
           "canary": rollout.canary.name if rollout.canary_id else None, "canary_percent": _share(rollout),
           "canary_started_at": rollout.canary_started_at, "updated_at": rollout.updated_at}
    if with_figures:
        out["versions"] = [f.as_dict() for f in comparison(rollout)]
    return out
