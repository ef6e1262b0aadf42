"""Staff's live view of the shared GPUs: each pool's load, and each tenant's queue counter and share."""

from __future__ import annotations

from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.db.models import Count, F, Sum
from django.shortcuts import render
from django.utils import timezone

from common import redis_clients
from common.charts import bar_chart
from serving.ledger_spool import spool_summary
from serving.models import BackendPool, UsageRecord
from tenants.models import Policy

WINDOW = timedelta(minutes=5)


def _redis_pool_state(pool_ids: list[int]) -> dict[int, dict]:
    """Slots in use and VTC counters per pool, from the scheduler's Redis keys (serving/scheduler.py)."""
    if not settings.REDIS_URL or not pool_ids:
        return {}
    import redis

    client = redis_clients.sync_client(settings.REDIS_URL, decode_responses=True)
    now_ms = int(timezone.now().timestamp() * 1000)
    state = {}
    try:
        for pid in pool_ids:
            slots = client.zcount(f"mtl:{{p{pid}}}:slots", now_ms, "+inf")
            counters = {int(t): float(c) for t, c in client.hgetall(f"mtl:{{p{pid}}}:vtc").items()}
            state[pid] = {"in_use": slots, "counters": counters}
    except redis.RedisError:
        return {}
    return state


@staff_member_required
def pools_live(request):
    since = timezone.now() - WINDOW
    pools = list(BackendPool.objects.select_related("base_model", "dedicated_tenant").prefetch_related("backends"))
    redis_state = _redis_pool_state([p.id for p in pools])
    # all_tenants: staff see every tenant's share of the shared pools.
    usage = (
        UsageRecord.all_tenants.filter(created_at__gte=since, pool__isnull=False)
        .values("pool_id", "tenant_id", "tenant__slug")
        .annotate(requests=Count("id"), service=Sum(F("input_tokens") + 2 * F("output_tokens")))
    )
    weights = dict(Policy.all_tenants.values_list("tenant_id", "weight"))
    by_pool: dict[int, list[dict]] = {}
    for row in usage:
        by_pool.setdefault(row["pool_id"], []).append(row)
    views = []
    for pool in pools:
        rows = by_pool.get(pool.id, [])
        total = sum(r["service"] or 0 for r in rows) or 1
        weight_sum = sum(weights.get(r["tenant_id"], 1) for r in rows) or 1
        state = redis_state.get(pool.id, {})
        tenants = sorted(
            (
                {
                    "slug": r["tenant__slug"],
                    "requests": r["requests"],
                    "service": r["service"] or 0,
                    "share": 100 * (r["service"] or 0) / total,
                    "fair_share": 100 * weights.get(r["tenant_id"], 1) / weight_sum,
                    "weight": weights.get(r["tenant_id"], 1),
                    "counter": state.get("counters", {}).get(r["tenant_id"]),
                }
                for r in rows
            ),
            key=lambda t: -t["service"],
        )
        capacity = pool.capacity or sum(b.max_concurrency for b in pool.backends.all() if b.enabled)
        views.append(
            {
                "pool": pool,
                "capacity": capacity,
                "in_use": state.get("in_use"),
                "backends": list(pool.backends.all()),
                "tenants": tenants,
                "chart": bar_chart([(t["slug"], round(t["share"], 1)) for t in tenants], height=120, unit=" %") if tenants else None,
            }
        )
    # Usage records the gateways on this host could not write yet (serving/ledger_spool.py): unbilled until replayed.
    spool = spool_summary(settings.PLATFORM_LEDGER_SPOOL_DIR)
    spool_since = datetime.fromtimestamp(spool.oldest, dt_timezone.utc) if spool.oldest is not None else None
    return render(request, "serving/staff_pools.html", {"pools": views, "window_minutes": int(WINDOW.total_seconds() // 60), "shared_state": bool(settings.REDIS_URL),
                                                        "spool": spool, "spool_since": spool_since, "spool_dir": settings.PLATFORM_LEDGER_SPOOL_DIR})
