"""The gateway's in-process configuration snapshot and its invalidation.

The hot path never queries the database. A `ConfigStore` holds one immutable `Snapshot` (keys, tenants with
their limits / prompt / model settings and routing table, pools, backends) and a poller thread reloads it
when the config version moves. The version is bumped after every relevant change (serving.signals): a Redis
counter when REDIS_URL is set, else the one `ConfigVersion` row. Polling every 0.5 s means a revoked key, a
suspension or a new system prompt takes effect in every gateway process within about a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Mapping

from django.conf import settings
from django.db import IntegrityError, close_old_connections, connection, transaction
from django.db.models import F
from django.utils import timezone
from django.utils.module_loading import import_string

from common import redis_clients
from serving.routing import Route, routes_for
from serving.tokencount import BOUND, counter_for

log = logging.getLogger(__name__)

REDIS_VERSION_KEY = "mtl:config:version"
FULL_RELOAD_S = 60.0  # reload even without a bump: a missed signal heals within a minute
INFERENCE_SCOPE = "inference"


# ---- the snapshot --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyEntry:
    id: int
    prefix: str
    secret_hash: str  # sha256 hex of the full key
    tenant_id: int
    scopes: frozenset
    expires_at: datetime | None
    # Rotation: the replaced secret's hash, accepted until `previous_valid_until` (tenants.services.api_key_rotate).
    previous_secret_hash: str = ""
    previous_valid_until: datetime | None = None
    # The key's own limits (0 = none; the tenant's apply either way) and allowed models (empty = all the tenant's).
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    monthly_token_budget: int = 0
    monthly_budget_cents: int = 0
    allowed_models: frozenset = frozenset()


@dataclass(frozen=True, slots=True)
class BackendEntry:
    id: int
    pool_id: int
    url: str
    max_concurrency: int
    loaded_adapters: frozenset


@dataclass(frozen=True, slots=True)
class PoolEntry:
    id: int
    name: str
    kind: str  # tgi | vllm | dev
    base_model: str
    hf_id: str
    context_length: int
    capacity: int  # scheduler capacity: the pool's setting, else the sum of its backends' concurrency
    dedicated_tenant_id: int | None
    backends: tuple  # of BackendEntry, enabled ones only
    # Counts prompts as the backends will (serving.tokencount): the base model's tokenizer when its files are here.
    counter: object = BOUND

    @property
    def enabled_backends(self) -> int:  # for serving.routing.pool_choice
        return len(self.backends)


@dataclass(frozen=True, slots=True)
class TenantEntry:
    id: int
    slug: str
    active: bool
    suspended_reason: str
    weight: int
    limits: object  # serving.admission.TenantLimits
    system_prompt: str
    system_message_rule: str  # keep | replace
    default_model: str
    default_max_tokens: int
    max_max_tokens: int
    default_temperature: float
    max_temperature: float
    cache_salt: str
    models: Mapping[str, Route]
    guard: object = None  # serving.guard.OutputGuard, compiled once per snapshot; None: output passes untouched
    # Users whose playground tokens count: active members with at least PLAYGROUND_ROLE. A token outlives a
    # removal or demotion by up to an hour, so the gateway checks the member is still here.
    playground_users: frozenset = frozenset()


@dataclass(frozen=True)
class Snapshot:
    version: object
    loaded_at: float
    keys: Mapping[str, KeyEntry] = field(default_factory=lambda: MappingProxyType({}))
    tenants: Mapping[int, TenantEntry] = field(default_factory=lambda: MappingProxyType({}))
    pools: Mapping[int, PoolEntry] = field(default_factory=lambda: MappingProxyType({}))
    # Keys limited to some models: key id -> its tenant's entry with only those models routed (built once per load).
    key_tenants: Mapping[int, TenantEntry] = field(default_factory=lambda: MappingProxyType({}))
    # Money budgets and per-key limits (serving.budgets): (tenant id, key id or None) -> BudgetLimits, only where one is
    # set; and the price list (billing's, by its dotted path), for the cost a request reserves and settles.
    budget_limits: Mapping[tuple, object] = field(default_factory=lambda: MappingProxyType({}))
    prices: object = None

    def budget_limits_for(self, tenant_id: int, key: KeyEntry | None):
        """The request's BudgetLimits, or None when neither its tenant nor its key has one."""
        return self.budget_limits.get((tenant_id, key.id if key is not None else None))

    def tenant_for(self, key: KeyEntry | None, tenant_id: int) -> TenantEntry | None:
        """The tenant entry a request authenticated by `key` sees: restricted to the key's allowed models, if any."""
        if key is not None and key.allowed_models:
            return self.key_tenants.get(key.id)
        return self.tenants.get(tenant_id)

    def backends(self):
        for pool in self.pools.values():
            yield from pool.backends


def tenant_cache_salt(tenant_id: int) -> str:
    """vLLM `cache_salt` for a tenant: derived from SECRET_KEY, so no tenant can guess or choose another's."""
    return hmac.new(settings.SECRET_KEY.encode(), f"cache-salt:{tenant_id}".encode(), hashlib.sha256).hexdigest()[:32]


def load_snapshot(version: object = None) -> Snapshot:
    """Read the whole gateway configuration from the database (a few queries; never on the request path)."""
    from serving.admission import TenantLimits
    from serving.guard import guard_from_config
    from serving.models import AdapterDeployment, AdapterRollout, Backend, BackendPool, BaseModel, MergedModel, ModelConfig
    from tenants.models import ROLE_RANK, ApiKey, Membership, Policy, Role, Tenant
    from tenants.selectors import effective_quota_tokens
    from tenants.services import PLAYGROUND_ROLE

    # `all_tenants` throughout: the snapshot is the gateway's copy of every tenant's configuration; the
    # request path scopes every lookup by the tenant of the authenticated key.
    keys = {}
    for k in ApiKey.all_tenants.filter(revoked_at__isnull=True):
        previous = k.previous_secret_hash if k.previous_valid_until is not None else ""
        keys[k.prefix] = KeyEntry(k.id, k.prefix, k.secret_hash, k.tenant_id, frozenset(k.scopes or ()), k.expires_at,
                                  previous, k.previous_valid_until if previous else None, k.requests_per_minute,
                                  k.tokens_per_minute, k.monthly_token_budget, k.monthly_budget_cents,
                                  frozenset(k.allowed_models or ()))

    base_models = {b.id: b for b in BaseModel.objects.all()}
    backends_by_pool: dict[int, list] = {}
    for b in Backend.objects.filter(enabled=True).order_by("id"):
        backends_by_pool.setdefault(b.pool_id, []).append(
            BackendEntry(b.id, b.pool_id, b.url.rstrip("/"), b.max_concurrency, frozenset(b.loaded_adapters or ()))
        )
    pools = {}
    for p in BackendPool.objects.all().order_by("name"):
        bm = base_models[p.base_model_id]
        bes = tuple(backends_by_pool.get(p.id, ()))
        pools[p.id] = PoolEntry(
            p.id, p.name, p.kind, bm.name, bm.hf_id or bm.name, bm.context_length,
            p.capacity or sum(b.max_concurrency for b in bes) or 1, p.dedicated_tenant_id, bes,
            counter_for(bm.local_path),  # loaded once per base model, not per reload
        )

    policies = {p.tenant_id: p for p in Policy.all_tenants.all()}
    configs = {c.tenant_id: c for c in ModelConfig.all_tenants.all()}
    deployments: dict[int, list] = {}
    for d in AdapterDeployment.all_tenants.exclude(state=AdapterDeployment.State.FAILED).select_related("adapter").order_by("id"):
        deployments.setdefault(d.tenant_id, []).append(d)
    rollouts: dict[int, list] = {}
    for r in AdapterRollout.all_tenants.select_related("current", "canary").order_by("id"):
        rollouts.setdefault(r.tenant_id, []).append(r)
    merged: dict[int, list] = {}
    for m in MergedModel.all_tenants.filter(state=MergedModel.State.SERVING).select_related("adapter__base_model").order_by("id"):
        merged.setdefault(m.tenant_id, []).append(m)
    playground_roles = [r for r in Role if ROLE_RANK[r] >= ROLE_RANK[Role(PLAYGROUND_ROLE)]]
    playground_users: dict[int, set[int]] = {}
    for tenant_id, user_id in Membership.all_tenants.filter(role__in=playground_roles, user__is_active=True).values_list("tenant_id", "user_id"):
        playground_users.setdefault(tenant_id, set()).add(user_id)
    defaults = {f.name: f.default for f in ModelConfig._meta.fields if f.name in ("default_max_tokens", "max_max_tokens", "default_temperature", "max_temperature", "system_message_rule")}

    base_list, pool_list = list(base_models.values()), list(pools.values())
    tenants = {}
    for t in Tenant.objects.select_related("active_prompt").all():
        policy = policies.get(t.id)
        cfg = configs.get(t.id)
        limits = TenantLimits(tenant_id=t.id)
        if policy is not None:
            limits = TenantLimits(
                tenant_id=t.id,
                requests_per_minute=policy.requests_per_minute,
                tokens_per_minute=policy.tokens_per_minute,
                quota_tokens=effective_quota_tokens(policy),
                quota_window=policy.quota_window,
                quota_mode=policy.quota_mode,
                max_concurrent=policy.max_concurrent_requests,
            )
        tenants[t.id] = TenantEntry(
            id=t.id,
            slug=t.slug,
            active=t.is_active,
            suspended_reason=t.suspended_reason,
            weight=policy.weight if policy else 1,
            limits=limits,
            system_prompt=(t.active_prompt.text if t.active_prompt_id else "").strip(),
            system_message_rule=cfg.system_message_rule if cfg else defaults["system_message_rule"],
            default_model=cfg.default_model if cfg else "",
            default_max_tokens=cfg.default_max_tokens if cfg else defaults["default_max_tokens"],
            max_max_tokens=cfg.max_max_tokens if cfg else defaults["max_max_tokens"],
            default_temperature=float(cfg.default_temperature if cfg else defaults["default_temperature"]),
            max_temperature=float(cfg.max_temperature if cfg else defaults["max_temperature"]),
            cache_salt=tenant_cache_salt(t.id),
            models=MappingProxyType(routes_for(tenant_id=t.id, tenant_slug=t.slug, allowed=cfg.allowed_models if cfg else (),
                                               base_models=base_list, pools=pool_list,
                                               deployments=deployments.get(t.id, ()), rollouts=rollouts.get(t.id, ()),
                                               merged=merged.get(t.id, ()))),
            guard=guard_from_config(cfg, label=t.slug),
            playground_users=frozenset(playground_users.get(t.id, ())),
        )
    budget_limits = _budget_limits(keys.values(), tenants)
    key_tenants = {}
    for k in keys.values():
        tenant = tenants.get(k.tenant_id)
        if k.allowed_models and tenant is not None:
            routes = {name: route for name, route in tenant.models.items() if name in k.allowed_models}
            default = tenant.default_model if tenant.default_model in routes else ""
            key_tenants[k.id] = dataclasses.replace(tenant, models=MappingProxyType(routes), default_model=default)
    prices = import_string(PRICE_BOOK)() if budget_limits else None
    return Snapshot(version, time.monotonic(), MappingProxyType(keys), MappingProxyType(tenants), MappingProxyType(pools),
                    MappingProxyType(key_tenants), MappingProxyType(budget_limits), prices)


PRICE_BOOK = "billing.spend.gateway_price_book"  # by path: apps are layers, and billing is above serving


def _budget_limits(keys, tenants) -> dict[tuple, object]:
    """BudgetLimits per (tenant, key) — (tenant, None) for the playground — where the tenant has a hard money limit
    (its hard budget or the staff ceiling) or a key has limits of its own."""
    from serving.budgets import BudgetLimits, generation_of
    from tenants.models import Policy, SpendBudget, budget_hard_limit_cents

    ceilings = dict(Policy.all_tenants.values_list("tenant_id", "budget_ceiling_cents"))
    hard = dict(ceilings)
    for b in SpendBudget.all_tenants.all():
        hard[b.tenant_id] = budget_hard_limit_cents(budget_cents=b.monthly_cents, mode=b.mode, ceiling_cents=ceilings.get(b.tenant_id, 0))
    by_tenant: dict[int, list] = {}
    for k in keys:
        by_tenant.setdefault(k.tenant_id, []).append(k)
    out = {}
    for tenant_id in tenants:
        tenant_hard = (hard.get(tenant_id) or 0) * MICROCENTS_PER_CENT
        own = by_tenant.get(tenant_id, [])
        budgeted = tuple(sorted(k.id for k in own if k.monthly_token_budget or k.monthly_budget_cents))
        common = dict(tenant_id=tenant_id, tenant_hard_microcents=tenant_hard, budgeted_keys=budgeted,
                      generation=generation_of(tenant_hard=bool(tenant_hard), budgeted_keys=budgeted))
        if tenant_hard:
            out[(tenant_id, None)] = BudgetLimits(**common)
        for k in own:
            limits = BudgetLimits(key_id=k.id, key_requests_per_minute=k.requests_per_minute, key_tokens_per_minute=k.tokens_per_minute,
                                  key_month_tokens=k.monthly_token_budget, key_month_microcents=k.monthly_budget_cents * MICROCENTS_PER_CENT,
                                  **common)
            if limits.active:
                out[(tenant_id, k.id)] = limits
    return out


MICROCENTS_PER_CENT = 1_000_000  # the budgets' unit (billing.spend)



# ---- the version counter -------------------------------------------------------------------------

def _redis_client():
    return redis_clients.sync_client(settings.REDIS_URL, timeout_s=1)


def _redis_where() -> str:
    """Redis's host, port and database, for logs (REDIS_URL may hold a password)."""
    return redis_clients.where(_redis_client())


def config_version_bump() -> None:
    """Tell every gateway process to reload its snapshot. Call after the change has committed."""
    if settings.REDIS_URL:
        _redis_client().incr(REDIS_VERSION_KEY)
        return
    from serving.models import ConfigVersion

    if ConfigVersion.objects.filter(pk=1).update(version=F("version") + 1) == 0:
        try:
            with transaction.atomic():
                ConfigVersion.objects.create(pk=1, version=1)
        except IntegrityError:
            ConfigVersion.objects.filter(pk=1).update(version=F("version") + 1)


def config_version_read() -> object:
    """The current version (any value: the poller only compares it with the last one it saw)."""
    if settings.REDIS_URL:
        return _redis_client().get(REDIS_VERSION_KEY)
    from serving.models import ConfigVersion

    row = ConfigVersion.objects.filter(pk=1).values_list("version", "updated_at").first()
    return row


# ---- the store -----------------------------------------------------------------------------------


class ConfigStore:
    """Holds the current snapshot; a daemon thread polls the version and reloads when it changes.

    Reading `store.snapshot` is one attribute load (the snapshot is replaced whole, never mutated).
    The same thread writes keys' `last_used_at` in batches (at most once a minute per key).
    """

    def __init__(self, *, poll_interval_s: float = 0.5, touch_interval_s: float = 60.0):
        self.poll_interval_s = poll_interval_s
        self.touch_interval_s = touch_interval_s
        self.snapshot: Snapshot | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._used_keys: set[int] = set()
        self._last_touch = time.monotonic()
        self.reloads = 0
        self._failing: str | None = None  # "redis" or "reload" while polls fail (logged once), else None
        self._failing_since = 0.0

    def note_key_used(self, key_id: int) -> None:
        self._used_keys.add(key_id)  # set.add is atomic under the GIL

    def refresh(self, *, force: bool = False) -> bool:
        """Reload if the version moved (or `force`). Returns True when a new snapshot was installed."""
        version = config_version_read()
        current = self.snapshot
        if not force and current is not None and version == current.version and time.monotonic() - current.loaded_at < FULL_RELOAD_S:
            return False
        self.snapshot = load_snapshot(version)
        self.reloads += 1
        return True

    def start(self) -> None:
        if self._thread is not None:
            return
        if self.snapshot is None:
            self.refresh(force=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gateway-config", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)  # the thread writes the last touches itself (below)
            self._thread = None
        else:
            self._flush_touches()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            self.poll()
        # The last keys' use, in this thread's own connection, closed next: written by the caller of stop() (the
        # gateway's shutdown runs it in an executor thread) it left that thread a connection no one closes.
        self._flush_touches()
        close_old_connections()
        connection.close()

    def poll(self) -> None:
        """One round of the poller: reload if the version moved, write keys' last use when it is due.

        A failure keeps the last good snapshot in service and is retried next round. It is logged once when it
        starts (a warning that says what it means and what to do when Redis is unreachable; the traceback for
        anything else), at debug level while it lasts, and once at info level when a round succeeds again. A round
        after a failure reloads in any case: a change made during a Redis outage could not bump the version."""
        try:
            self.refresh(force=self._failing is not None)
        except Exception as exc:  # keep serving the last good snapshot; retry next round
            if self._note_failure(exc) != "redis":
                connection.close()  # a database error may have left it unusable
            return
        if self._failing is not None:
            what = f"Redis at {_redis_where()} answers again" if self._failing == "redis" else "gateway config reload works again"
            log.info("%s after %.1f s: the config snapshot is current again.", what, time.monotonic() - self._failing_since)
            self._failing = None
        if time.monotonic() - self._last_touch >= self.touch_interval_s:
            self._flush_touches()

    def _note_failure(self, exc: Exception) -> str:
        """Log the failure if it is a new one; returns its kind ("redis" or "reload")."""
        from redis.exceptions import RedisError

        kind = "redis" if settings.REDIS_URL and isinstance(exc, RedisError) else "reload"
        if self._failing == kind:
            log.debug("gateway config reload still failing (%s: %s)", type(exc).__name__, exc)
            return kind
        self._failing, self._failing_since = kind, time.monotonic()
        current = self.snapshot
        age = f"{time.monotonic() - current.loaded_at:.0f} s old" if current is not None else "none loaded"
        if kind == "redis":
            log.warning("Redis at %s is unreachable (%s: %s): this gateway process keeps serving its config snapshot (%s), "
                        "so revoked keys, suspensions, new system prompts and deployments do not reach it until Redis "
                        "answers again. Check that Redis is running and that REDIS_URL points at it; the gateway retries "
                        "every %.1f s and says here when it is back.", _redis_where(), type(exc).__name__, exc, age,
                        self.poll_interval_s)
        else:
            log.exception("gateway config reload failed; serving the previous snapshot (%s); retried every %.1f s, "
                          "logged again when it works", age, self.poll_interval_s)
        return kind

    def _flush_touches(self) -> None:
        self._last_touch = time.monotonic()
        if not self._used_keys:
            return
        ids, self._used_keys = self._used_keys, set()
        from tenants.models import ApiKey

        try:
            # all_tenants: a batch across tenants, by primary keys the gateway authenticated itself.
            ApiKey.all_tenants.filter(pk__in=ids).update(last_used_at=timezone.now())
        except Exception:
            log.exception("could not record keys' last use")
