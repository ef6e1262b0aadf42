"""Reads for the console and the API: which base models and pools serve a tenant (the one routing rule), and the
usage ledger (usage per day and model or API key, quota utilization)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from django.db.models import Count, Sum
from django.db.models.functions import TruncDate

from serving.admission import WARN_FRACTION, window_bounds
from serving.models import BackendPool, BaseModel, ModelConfig, UsageRecord
from serving.routing import base_model_pool, may_use, merged_pools, pool_views, serving_merged
from tenants.models import ApiKey, Policy, Tenant
from tenants.selectors import effective_quota_tokens


def pool_for(tenant, base_model) -> BackendPool | None:
    """The pool that serves `base_model` to `tenant`, by the routing rule (serving.routing.base_model_pool: a pool
    running one of the tenant's merged models serves nothing else, as serving.routing.merged_pools says)."""
    pools = pool_views(BackendPool.objects.reachable_by(tenant).filter(base_model=base_model))
    running = merged_pools(serving_merged(tenant), {p.id: p for p in pools}, tenant_id=tenant.pk)
    choice = base_model_pool(base_model.name, pools, running, tenant_id=tenant.pk)
    return BackendPool.objects.select_related("base_model").get(pk=choice.id) if choice else None


def base_models_for_tenant(tenant) -> list[BaseModel]:
    """Base models the tenant may use (`serving.routing.may_use`): available to all (within its allowed models) or
    served on a pool dedicated to it."""
    cfg = ModelConfig.objects.for_tenant(tenant).first()
    allowed = set(cfg.allowed_models or ()) if cfg else set()
    dedicated = set(BackendPool.objects.dedicated_to(tenant).values_list("base_model_id", flat=True))
    return [bm for bm in BaseModel.objects.all() if may_use(bm, allowed=allowed, dedicated=bm.pk in dedicated)]


def usage_by_day_and_model(tenant: Tenant, *, days: int = 30, today: date | None = None) -> list[dict]:
    """Rows {day, model, requests, input_tokens, output_tokens} over the last `days` days (UTC), oldest first."""
    return _usage_rows(tenant, ("day", "model"), days=days, today=today)


def usage_by_day_and_key(tenant: Tenant, *, days: int = 30, today: date | None = None) -> list[dict]:
    """Rows {day, key_id, key_name, key_prefix, key_revoked, requests, input_tokens, output_tokens, total_tokens} over
    the last `days` UTC days, oldest first. Requests made from the console's Playground have no key (key_id None)."""
    return _with_keys(tenant, _usage_rows(tenant, ("day", "api_key_id"), days=days, today=today))


def usage_export_rows(tenant: Tenant, *, days: int = 30, today: date | None = None) -> list[dict]:
    """The finest grouping, for the CSV export: one row per UTC day, model and API key, oldest first."""
    return _with_keys(tenant, _usage_rows(tenant, ("day", "model", "api_key_id"), days=days, today=today))


def first_day(days: int, today: date | None = None) -> date:
    """The first UTC day of a period of `days` days ending today."""
    return (today or datetime.now(timezone.utc).date()) - timedelta(days=days - 1)


def _usage_rows(tenant: Tenant, group: tuple[str, ...], *, days: int, today: date | None) -> list[dict]:
    start = datetime.combine(first_day(days, today), datetime.min.time(), tzinfo=timezone.utc)
    rows = (
        UsageRecord.objects.for_tenant(tenant)
        .filter(created_at__gte=start)
        .annotate(day=TruncDate("created_at", tzinfo=timezone.utc))
        .values(*group)
        .annotate(requests=Count("id"), input_tokens=Sum("input_tokens"), output_tokens=Sum("output_tokens"))
        .order_by(*group)
    )
    return [{**r, "total_tokens": r["input_tokens"] + r["output_tokens"]} for r in rows]


def _with_keys(tenant: Tenant, rows: list[dict]) -> list[dict]:
    keys = {k.pk: k for k in ApiKey.objects.for_tenant(tenant).filter(pk__in={r["api_key_id"] for r in rows} - {None})}
    for r in rows:
        key = keys.get(r.pop("api_key_id"))
        r.update(key_id=key.pk if key else None, key_name=key.name if key else "", key_prefix=key.prefix if key else "",
                 key_revoked=bool(key and key.revoked_at))
    return rows


def daily_totals(rows: list[dict], *, days: int = 30, today: date | None = None) -> list[tuple[date, int]]:
    """Total tokens per day, every day present (zero-filled), from usage_by_day_and_model rows."""
    today = today or datetime.now(timezone.utc).date()
    totals = {today - timedelta(days=i): 0 for i in range(days)}
    for r in rows:
        if r["day"] in totals:
            totals[r["day"]] += r["total_tokens"]
    return sorted(totals.items())


def tokens_used_in_window(tenant: Tenant, kind: str, now: datetime | None = None) -> int:
    """Tokens (input + output) the ledger holds for the current quota window."""
    start, end = window_bounds(kind, now)
    agg = UsageRecord.objects.for_tenant(tenant).filter(created_at__gte=start, created_at__lt=end).aggregate(
        i=Sum("input_tokens"), o=Sum("output_tokens")
    )
    return (agg["i"] or 0) + (agg["o"] or 0)


def quota_status(tenant: Tenant, now: datetime | None = None) -> dict:
    """U = used / quota for the window in force, and what the gateway does about it.

    state: 'unlimited', 'ok', 'warning' (≥ 80 %), 'throttled' (soft, ≥ 100 %) or 'exhausted' (hard, ≥ 100 %).
    window_end is exclusive (00:00 UTC of the next day or month); window_last_day is the window's last UTC day, as
    people read a period ("1 – 31 Dec", not "– 1 Jan").
    """
    policy = Policy.objects.for_tenant(tenant).get()
    quota = effective_quota_tokens(policy)
    used = tokens_used_in_window(tenant, policy.quota_window, now)
    start, end = window_bounds(policy.quota_window, now)
    window = {"window_start": start, "window_end": end, "window_last_day": (end - timedelta(microseconds=1)).date()}
    if not quota:
        return {"state": "unlimited", "used": used, "quota": 0, "percent": None, **window, "policy": policy}
    percent = 100 * used / quota
    if used >= quota:
        state = "throttled" if policy.quota_mode == "soft" else "exhausted"
    elif used >= WARN_FRACTION * quota:
        state = "warning"
    else:
        state = "ok"
    return {"state": state, "used": used, "quota": quota, "percent": percent, **window, "policy": policy}


def utilization_history(tenant: Tenant, status: dict, daily: list[tuple[date, int]]) -> list[tuple[str, float]]:
    """Quota utilization (percent) at the end of each day shown: cumulative within a month window, per day for a day window."""
    quota = status["quota"]
    if not quota:
        return []
    points, running = [], 0
    month_start = status["window_start"].date() if status["policy"].quota_window == "month" else None
    for day, tokens in daily:
        if month_start is None:
            running = tokens
        elif day >= month_start:
            running += tokens
        else:
            continue
        points.append((day.strftime("%m-%d"), round(100 * running / quota, 1)))
    return points
