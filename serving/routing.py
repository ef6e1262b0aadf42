"""THE routing rule: which model names a tenant may call, and which pool serves each.

`routes_for` is pure (plain objects in, routes out). The gateway's snapshot calls it over everything it loaded for
every tenant (serving.config); the console, the playground and adapter deployment call it through `tenant_routes`,
which loads the same inputs for one tenant. So the model list a tenant sees is, by construction, the list the
gateway routes — a failed deployment, a model staff took away or another tenant's dedicated pool included.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Route:
    """What a tenant-visible model name resolves to."""

    name: str  # tenant-visible name, echoed in responses
    pool_id: int
    adapter: str | None  # backend-side adapter id (only on backends whose loaded_adapters list it)
    base_model: str
    owned_by: str
    created: int
    # Canary rollout (serving.models.AdapterRollout): the new version's route (same `name`) and its share, in percent,
    # of this name's requests; the gateway picks per request (serving.gateway.plan.pick_version).
    canary: Route | None = None
    canary_percent: int = 0
    # Merged model (serving.models.MergedModel): the backends' model id when it is not the pool's base model. The
    # request then carries no adapter (`adapter` still names the version for the ledger and prices).
    model_id: str | None = None


@dataclass(frozen=True, slots=True)
class PoolView:
    """What routing needs of a pool (the gateway's PoolEntry has these too)."""

    id: int
    name: str
    base_model: str  # the base model's public name
    dedicated_tenant_id: int | None
    enabled_backends: int


def may_use(base_model, *, allowed: set[str], dedicated: bool) -> bool:
    """Whether a tenant may use a base model: served on a pool dedicated to it, or available to all and within its
    allowed models (none listed: all)."""
    return dedicated or (base_model.available_to_all and (not allowed or base_model.name in allowed))


def pool_choice(pools, *, tenant_id: int):
    """Which of a base model's pools serves it to a tenant.

    `pools`: the base model's pools, each with `name`, `dedicated_tenant_id` and `enabled_backends` (a count).
    A pool dedicated to the tenant comes first (isolated tenancy: its own pool, even while it has no backend up);
    else a shared pool. Within each, pools with enabled backends before those without, then by name. None when no
    pool serves the base model to this tenant; another tenant's dedicated pool never does.
    """
    def order(pool):
        return (pool.enabled_backends == 0, pool.name)

    for tier in (tenant_id, None):
        candidates = [p for p in pools if p.dedicated_tenant_id == tier]
        if candidates:
            return min(candidates, key=order)
    return None


def merged_pools(merged, pools_by_id, *, tenant_id: int) -> dict:
    """THE merged-model rule: pool id -> the merged model its backends run. Only a `serving` MergedModel of the
    tenant's own adapter, on a pool dedicated to the tenant that serves the adapter's base model, counts (the first
    of `merged`'s order on each pool); never another tenant's adapter or pool, never on weights it was not merged
    into. Such a pool serves nothing else — no base model, no LoRA adapter: its backends run the merged weights.

    `merged`: the tenant's MergedModel rows (adapter and its base model loaded), by id (`serving_merged`).
    `pools_by_id`: PoolView-likes by id. Both `routes_for` and `serving.selectors.pool_for` ask this.
    """
    from serving.models import MergedModel

    running = {}
    for m in merged:
        pool = pools_by_id.get(m.pool_id)
        if (m.state == MergedModel.State.SERVING and pool is not None and pool.dedicated_tenant_id == tenant_id
                and m.tenant_id == tenant_id and m.adapter.tenant_id == tenant_id
                and m.adapter.base_model.name == pool.base_model and m.pool_id not in running):
            running[m.pool_id] = m
    return running


def base_model_pool(base_model: str, pools, running, *, tenant_id: int):
    """The pool that serves `base_model` (its name) to the tenant: `pool_choice` among its pools, less those running
    a merged model (`running`: `merged_pools`' answer). None when none does."""
    return pool_choice([p for p in pools if p.base_model == base_model and p.id not in running], tenant_id=tenant_id)


def routes_for(*, tenant_id: int, tenant_slug: str, allowed, base_models, pools, deployments, rollouts=(),
               merged=()) -> dict[str, Route]:
    """The tenant's routing table (docs/gateway.md, "Routing"): each base model it may use, on the pool
    `pool_choice` names, then its own adapters with a deployment that has not failed, then its merged models that
    serve (the adapter's name on its dedicated pool, the merged folder as the backends' model, in place of the
    adapter's LoRA route), then its rollouts: a rollout's name routes to its current version's route, with its
    canary's (when that one routes too) and share.

    `base_models`: objects with name, available_to_all, created_at. `pools`: PoolView-like (any tenant's; another
    tenant's dedicated pool is never chosen). `deployments`: the tenant's AdapterDeployment rows (adapter loaded),
    failed ones included or not: they are skipped here. `rollouts`: the tenant's AdapterRollout rows (current and
    canary loaded); one whose current version does not route leaves its name as it was. `merged`: the tenant's
    MergedModel rows (adapter and its base model loaded); those `merged_pools` counts route, and their pools then
    route nothing else (the base model goes to a shared pool, if the tenant may use one).
    """
    from serving.models import AdapterDeployment

    pools = list(pools)
    by_id = {p.id: p for p in pools}
    allowed = set(allowed or ())
    dedicated = {p.base_model for p in pools if p.dedicated_tenant_id == tenant_id}
    usable = {bm.name for bm in base_models if may_use(bm, allowed=allowed, dedicated=bm.name in dedicated)}
    serving = merged_pools(merged, by_id, tenant_id=tenant_id)
    routes: dict[str, Route] = {}
    for bm in base_models:
        if bm.name not in usable:
            continue
        pool = base_model_pool(bm.name, pools, serving, tenant_id=tenant_id)
        if pool is not None:
            # Isolated tenancy: a pool dedicated to this tenant serves the base model for it, and only for it.
            owned_by = tenant_slug if pool.dedicated_tenant_id == tenant_id else "platform"
            routes[bm.name] = Route(bm.name, pool.id, None, bm.name, owned_by, int(bm.created_at.timestamp()))
    for d in deployments:
        if d.state == AdapterDeployment.State.FAILED:
            continue  # no backend took it: the gateway would have nowhere to send it
        pool = by_id.get(d.pool_id)
        if pool is None or pool.dedicated_tenant_id not in (None, tenant_id) or d.adapter.name in routes or d.pool_id in serving:
            continue
        # Only the tenant's own adapter (a hand-made deployment row may name another's), and only on a base
        # model the tenant may still use: an adapter must not reopen a model staff took away.
        if d.tenant_id != tenant_id or d.adapter.tenant_id != tenant_id or pool.base_model not in usable:
            continue
        routes[d.adapter.name] = Route(d.adapter.name, pool.id, d.adapter.name, pool.base_model, tenant_slug,
                                       int(d.adapter.created_at.timestamp()))
    for pool_id, m in serving.items():
        if m.adapter.name in usable or by_id[pool_id].base_model not in usable:
            continue
        routes[m.adapter.name] = Route(m.adapter.name, pool_id, m.adapter.name, by_id[pool_id].base_model, tenant_slug,
                                       int(m.adapter.created_at.timestamp()), model_id=m.served_name)
    by_adapter = {r.adapter: r for r in routes.values() if r.adapter is not None}
    for rollout in rollouts:
        if rollout.tenant_id != tenant_id or rollout.name in usable:
            continue  # never another tenant's, never in place of a base model
        current = by_adapter.get(rollout.current.name) if rollout.current.tenant_id == tenant_id else None
        if current is None:
            continue
        canary = None
        if rollout.canary is not None and rollout.canary_percent > 0 and rollout.canary.tenant_id == tenant_id:
            canary = by_adapter.get(rollout.canary.name)
            if canary is not None and canary.base_model != current.base_model:
                canary = None
        routes[rollout.name] = replace(current, name=rollout.name,
                                       canary=replace(canary, name=rollout.name) if canary else None,
                                       canary_percent=rollout.canary_percent if canary else 0)
    return routes


def pool_views(queryset) -> list[PoolView]:
    """PoolViews of BackendPool rows (base model name and enabled backend count in the same query)."""
    from django.db.models import Count, Q

    rows = (queryset.select_related("base_model")
            .annotate(n_enabled=Count("backends", filter=Q(backends__enabled=True))).order_by("name"))
    return [PoolView(p.id, p.name, p.base_model.name, p.dedicated_tenant_id, p.n_enabled) for p in rows]


def tenant_routes(tenant) -> dict[str, Route]:
    """`routes_for` over the database, for one tenant: what the gateway's snapshot routes for it."""
    from serving.models import AdapterDeployment, AdapterRollout, BackendPool, BaseModel, ModelConfig

    cfg = ModelConfig.objects.for_tenant(tenant).first()
    return routes_for(
        tenant_id=tenant.pk, tenant_slug=tenant.slug, allowed=cfg.allowed_models if cfg else (),
        base_models=list(BaseModel.objects.all()),
        pools=pool_views(BackendPool.objects.reachable_by(tenant)),
        deployments=AdapterDeployment.objects.for_tenant(tenant).select_related("adapter").order_by("id"),
        rollouts=AdapterRollout.objects.for_tenant(tenant).select_related("current", "canary").order_by("id"),
        merged=serving_merged(tenant),
    )


def serving_merged(tenant):
    """The tenant's `serving` merged models, as `merged_pools` reads them (adapter and base model loaded, by id)."""
    from serving.models import MergedModel

    return (MergedModel.objects.for_tenant(tenant).filter(state=MergedModel.State.SERVING)
            .select_related("adapter__base_model").order_by("id"))
