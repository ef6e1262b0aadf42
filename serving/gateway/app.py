"""The inference gateway: a raw ASGI application (no Django request cycle) for the inference paths.

One request is one pipeline, read top to bottom in `GatewayApp._inference` (docs/gateway.md, "The request path";
the module and function of each stage: docs/architecture.md, "The gateway's pipeline"):
authenticate (auth.py) → parse (endpoints.py, parsing.py) → route and rewrite for the backend (plan.py) → admit
(serving.admission) → schedule (serving.scheduler) → call the backends, failing over before the first byte → relay
in the client's protocol and mode (relays.py) → account (accounting.py: settled, then recorded in the ledger, each
exactly once; both before the last byte of a completed answer, so a client that waits for its answer never finds it
still counted against its limits). `Response` (response.py) is the one place the answer starts.

Every admitted request is in the process's journal (serving/journal.py) from admission until it is recorded
and settled, with the tokens delivered so far, so that a crash of the process loses no billed usage: another
gateway process on the host (or this one's successor) turns what it finds there into ledger records.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import time

import aiohttp

from serving.config import ConfigStore, Snapshot
from serving.drivers import BackendError, driver_for
from serving.drivers.base import ADAPTER_NOT_LOADED, context_overflow, special_token_ids
from serving.gateway import budget_gate, metrics
from serving.gateway.accounting import Accounting
from serving.gateway.auth import authenticate
from serving.gateway.endpoints import METRICS, MODEL, MODEL_PREFIX, MODELS, ROUTES, Endpoint, endpoint_for
from serving.gateway.errors import ApiError, context_length_exceeded
from serving.gateway.parsing import count_prompt, parse_json, parse_request
from serving.gateway.plan import Plan, plan_request, request_ids
from serving.gateway.refusals import RefusalMemo, refusal_error
from serving.gateway.relays import relay_for
from serving.gateway.response import Response
from serving.gateway.settings import GatewaySettings
from serving.health import HealthMonitor
from serving.journal import SCAN_S as JOURNAL_SCAN_S
from serving.journal import Journal, adopt_dead
from serving.ledger import Ledger

log = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
ADAPTER_RETRY_AFTER_S = 3  # a forgotten adapter is reloaded within a health round and a LoRA load (about a second)


GC_YOUNG_THRESHOLD = 10_000  # allocations between collections of the youngest generation (Python's default: 700)


def tune_gc() -> None:
    """When the gateway has started: the collector's youngest generation is collected every GC_YOUNG_THRESHOLD
    allocations instead of 700. A young collection scans what the requests in flight hold, whatever the threshold, so a
    rarer one costs little more. Measured in a gateway at c=32 with Redis (bench/gateway.py, about 12 s of CPU): 481
    collections took 0.67 s (5.5 % of the CPU), 4 of them full (0.32 s, up to 89 ms each: p99 outliers); then 9 took
    0.05 s (0.4 %), none full. Nothing is frozen (`gc.freeze` would keep alive garbage that only a collection closes,
    such as a stopped thread's database connection)."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def is_gateway_path(scope) -> bool:
    """True for the paths the gateway serves (portal.asgi dispatches them before Django)."""
    path = scope["path"]
    return path in ROUTES or path.startswith(MODEL_PREFIX) or (path == "/" and scope.get("method") == "POST")


class GatewayApp:
    def __init__(self, settings: GatewaySettings | None = None, store: ConfigStore | None = None):
        self.settings = settings or GatewaySettings.from_env()
        self.store = store or ConfigStore(poll_interval_s=self.settings.config_poll_s)
        self.health = HealthMonitor(self.store, interval_s=self.settings.health_interval_s,
                                    timeout_s=self.settings.health_timeout_s, persist_s=self.settings.health_persist_s)
        self.ledger = Ledger(spool_dir=self.settings.ledger_spool_dir, replay_interval_s=self.settings.ledger_replay_interval_s)
        self.session: aiohttp.ClientSession | None = None
        self.tenant_label = metrics.TenantLabels(self.settings.metrics_top_tenants)
        self._loop = None
        self._background: set[asyncio.Task] = set()  # fire-and-forget work kept alive until done
        self.journal: Journal | None = None
        self._recovering: set = set()  # dead journals being recovered by this process
        self._journal_scan: asyncio.Task | None = None
        self._start_lock: asyncio.Lock | None = None
        self._start_lock_loop = None
        self._refusals = RefusalMemo()  # tenants whose requests/min bucket is known empty: refused after authentication

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Load the config, open the backend session, run a first health round, start the background tasks."""
        await asyncio.to_thread(self.store.start)
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=self.settings.connect_timeout_s, sock_read=self.settings.read_timeout_s),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True),
            auto_decompress=False,
        )
        await self.health.check_all(self.session)
        self.health.start(self.session)
        self.ledger.start()
        self._loop = asyncio.get_running_loop()
        if self.settings.journal_dir is not None:
            self.journal = Journal(self.settings.journal_dir)
            # What a crashed predecessor left is recorded before this process admits anything (the embedded
            # default's counters are then seeded from a ledger that has it), within reason.
            tasks = self._recover_dead_journals()
            if tasks:
                await asyncio.wait(tasks, timeout=10)
            self._journal_scan = asyncio.get_running_loop().create_task(self._journal_scan_loop(), name="journal-scan")
        tune_gc()

    async def shutdown(self) -> None:
        if self._loop is None:
            return
        if self._journal_scan is not None:
            self._journal_scan.cancel()
            self._journal_scan = None
        if self._background:  # records waiting for their settle: into the ledger's queue before it drains
            await asyncio.wait(set(self._background), timeout=5)
        await self.ledger.stop()
        if self.journal is not None:
            self.journal.stop()
            self.journal = None
        await self.health.stop()
        if self.session is not None:
            await self.session.close()
        await asyncio.to_thread(self.store.stop)
        self._loop = None

    async def _ensure_started(self) -> None:
        """Started by the lifespan protocol, or lazily on the first request of an event loop."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._start_lock is None or self._start_lock_loop is not loop:  # one lock per event loop
            self._start_lock, self._start_lock_loop = asyncio.Lock(), loop
        async with self._start_lock:
            if self._loop is not loop:
                await self.startup()

    # ---- the journal's recovery ----------------------------------------------------------------------

    def _recover_dead_journals(self) -> list[asyncio.Task]:
        """Adopt the journals of stopped gateway processes on this host and recover each in a task."""
        tasks = []
        for dead in adopt_dead(self.settings.journal_dir, own=self.journal.path, busy=self._recovering):
            self._recovering.add(dead.path)
            task = asyncio.get_running_loop().create_task(self._recover_one(dead), name="journal-recovery")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            tasks.append(task)
        return tasks

    async def _recover_one(self, dead) -> None:
        from serving.admission import get_admission
        from serving.journal_recovery import journal_recover
        from serving.scheduler import get_scheduler

        try:
            await journal_recover(dead, ledger=self.ledger, admission=get_admission(), scheduler=get_scheduler())
        except Exception:
            log.exception("journal %s: recovery failed; it is tried again in %.0f s", dead.path, JOURNAL_SCAN_S)
            dead.release()
        finally:
            self._recovering.discard(dead.path)

    async def _journal_scan_loop(self) -> None:
        while True:
            await asyncio.sleep(JOURNAL_SCAN_S)
            try:
                self._recover_dead_journals()
            except Exception:
                log.exception("journal scan failed")

    async def lifespan(self, scope, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("gateway startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ---- dispatch -----------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self.lifespan(scope, receive, send)
        await self._ensure_started()
        path = scope["path"]
        endpoint = endpoint_for(path)
        out = Response(send, endpoint)
        if endpoint.compat:  # TGI's POST / (the only method portal.asgi sends here)
            return await self._guarded(self._inference, scope, receive, out)
        if scope["method"] != endpoint.method:
            return await self._refuse(out, ApiError(405, f"Use {endpoint.method} on {path}.", code="method_not_allowed",
                                                    headers={"allow": endpoint.method}))
        if endpoint is METRICS:
            return await self._metrics(scope, out)
        if not endpoint.inference:
            return await self._models(scope, out, path[len(MODEL_PREFIX):] if endpoint is MODEL else None)
        return await self._guarded(self._inference, scope, receive, out)

    async def _guarded(self, handler, scope, receive, out: Response) -> None:
        """Whatever fails unexpectedly, the client gets an error in its API's shape (never a plain-text 500)."""
        try:
            await handler(scope, receive, out)
        except Exception:
            log.exception("gateway: %s failed unexpectedly", scope["path"])
            err = ApiError(500, "The gateway failed on this request. Retry; if it persists, tell the platform team the time "
                                "of the request.", type="server_error", code="internal_error")
            if not out.started:
                self._count(out.endpoint, err.status)
            await out.fail(err)

    # ---- helpers ------------------------------------------------------------------------------------

    @staticmethod
    def _header(scope, name: bytes) -> str | None:
        for k, v in scope["headers"]:
            if k == name:
                return v.decode("latin-1")
        return None

    def _count(self, endpoint: Endpoint, status: int, tenant=None) -> None:
        metrics.REQUESTS.labels(endpoint.name, str(status), self.tenant_label(getattr(tenant, "slug", None))).inc()

    async def _refuse(self, out: Response, err: ApiError, tenant=None, endpoint: Endpoint | None = None) -> None:
        """An error answer, counted in the metrics under `endpoint` (the request's, once its body resolved it)."""
        self._count(endpoint or out.endpoint, err.status, tenant)
        await out.error(err)

    async def _read_body(self, scope, receive) -> bytes:
        cap = self.settings.max_body_bytes
        length = self._header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise ApiError(413, f"The request body is larger than {cap} bytes.", code="request_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError
            body = message.get("body", b"")
            size += len(body)
            if size > cap:
                raise ApiError(413, f"The request body is larger than {cap} bytes.", code="request_too_large")
            chunks.append(body)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _authenticate(self, scope, snap: Snapshot):
        """(key entry or None, tenant entry) for the request's credential (serving/gateway/auth.py); the key's use is
        noted for its `last_used_at`."""
        key, tenant = authenticate(self._header(scope, b"authorization"), snap)
        if key is not None:
            self.store.note_key_used(key.id)
        return key, tenant

    # ---- /metrics and /v1/models --------------------------------------------------------------------

    async def _metrics(self, scope, out: Response) -> None:
        token = self.settings.metrics_token
        if token:
            auth = self._header(scope, b"authorization") or ""
            if not hmac.compare_digest(auth.encode(), f"Bearer {token}".encode()):
                return await out.json(401, b'{"error":"metrics need the bearer token"}')
        elif (scope.get("client") or ("",))[0] not in LOOPBACK:
            return await out.json(403, b'{"error":"metrics are served to loopback only unless PLATFORM_METRICS_TOKEN is set"}')
        body = metrics.render(self.store.snapshot, self.health, self.ledger)
        await out.start(200, [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")])
        await out.last(body, more_body_key=False)

    async def _models(self, scope, out: Response, one: str | None) -> None:
        import json

        try:
            _, tenant = self._authenticate(scope, self.store.snapshot)
        except ApiError as err:
            return await self._refuse(out, err, endpoint=MODELS)

        def item(r):
            return {"id": r.name, "object": "model", "created": r.created, "owned_by": r.owned_by}

        if one is not None:
            route = tenant.models.get(one)
            if route is None:
                return await self._refuse(out, ApiError(404, f"The model `{one}` does not exist or you do not have access to it.",
                                                        param="model", code="model_not_found"), tenant, MODELS)
            body = item(route)
        else:
            body = {"object": "list", "data": [item(r) for r in sorted(tenant.models.values(), key=lambda r: r.name)]}
        self._count(MODELS, 200, tenant)
        await out.json(200, json.dumps(body).encode())

    # ---- inference: the pipeline -------------------------------------------------------------------

    async def _inference(self, scope, receive, out: Response) -> None:
        """One inference request, top to bottom: authenticate → parse → route → admit → schedule → call → relay →
        account. A refusal before admission counts one request against the tenant's requests/min (docs/limits.md);
        from admission on, the request's Accounting settles and records it exactly once, whatever ends it
        (docs/gateway.md, "The request path")."""
        started_at = time.perf_counter()
        request_id, out.headers["x-request-id"] = request_ids(self._header(scope, b"x-request-id"))
        endpoint, tenant = out.endpoint, None
        try:
            snap = self.store.snapshot
            key, tenant = self._authenticate(scope, snap)  # authenticate
            if (held := self._refusals.replay(tenant)) is not None:  # its requests/min bucket is known to be empty
                err, headers = held
                out.headers.update(headers)
                return await self._refuse(out, err, tenant, endpoint)  # its body not even read
            body = await self._read_body(scope, receive)
            data = parse_json(body)  # parse
            endpoint = endpoint.resolve(data)  # TGI's POST /: `stream` picks the route
            req = parse_request(endpoint, data)
            plan = plan_request(req, tenant, snap.pools)  # route, and the backend request
            # The prompt as the backend counts it: exact with the model's tokenizer, else a bound (docs/limits.md).
            plan.fit(await count_prompt(plan.backend_request, plan.pool))
        except asyncio.CancelledError:
            return  # the client left while sending its body
        except ApiError as err:
            if tenant is not None:
                await self._count_refused(tenant, out)
            return await self._refuse(out, err, tenant, endpoint)
        admitted = await self._admit(request_id, started_at, key, tenant, plan, out)  # admit
        if admitted is None:
            return
        acct, throttled = admitted
        try:  # schedule → call → relay, cancelled if the client hangs up first
            await self._until_disconnect(self._serve(acct, plan, throttled, out), receive, acct)
        finally:
            if acct.pending_slot is not None:  # taken with the admission, and the request never reached its schedule stage
                from serving.scheduler import get_scheduler

                slot, acct.pending_slot = acct.pending_slot, None
                await get_scheduler().release(slot, input_tokens=0, output_tokens=0, refund=True)
            await acct.close()  # account: settled now if nothing settled it (the client left, or nothing was sent)

    async def _count_refused(self, tenant, out: Response) -> None:
        """A request refused before admission counts one against the tenant's requests/min, as an admitted one does
        (one call, on this refusal path only); once that empties the bucket, the next are refused after authentication."""
        if not tenant.limits.requests_per_minute:
            return
        from serving.admission import get_admission

        asked_at = time.monotonic()
        counted = await get_admission().count_refused(tenant.limits)
        out.headers.update(counted.headers)
        self._refusals.note(tenant, counted, asked_at=asked_at)

    async def _admit(self, request_id: str, started_at: float, key, tenant, plan: Plan, out: Response):
        """Reserve the prompt + max tokens against the tenant's limits: (its Accounting, throttled), or None when
        refused (answered here)."""
        from serving.admission import get_admission
        from serving.scheduler import get_scheduler

        admission, scheduler, pool = get_admission(), get_scheduler(), plan.pool
        try:  # the key's own limits and the money budgets first (serving/gateway/budget_gate.py): given back if refused below
            budget = await budget_gate.admit_budgets(self.store.snapshot, tenant, key, plan, request_id)
        except ApiError as err:
            return await self._refuse(out, err, tenant, plan.req.endpoint)
        # With Redis, the pool's fast-path slot is taken in admission's script: one round trip for both.
        offer = scheduler.offer(pool_id=pool.id, capacity=pool.capacity, tenant_id=tenant.id, weight=tenant.weight,
                                input_tokens=plan.prompt.tokens, max_output_tokens=plan.max_tokens)
        asked_at = time.monotonic()
        decision = await admission.admit(tenant.limits, request_id=request_id, reserve_tokens=plan.reserve_tokens, slot_offer=offer)
        out.headers.update(decision.headers)
        if decision.warn:
            self._warn_quota(tenant, decision)
        self._refusals.note(tenant, decision, asked_at=asked_at)  # its bucket empty now: the next refused after authentication
        if not decision.allowed:
            await budget_gate.release(budget)
            return await self._refuse(out, refusal_error(decision), tenant, plan.req.endpoint)
        route = plan.route
        acct = Accounting(request_id=request_id, endpoint=plan.req.endpoint, tenant=tenant, key_id=key.id if key else None,
                          model=route.name, adapter=route.adapter or "", pool=plan.pool, started_at=started_at,
                          prompt_estimate=plan.prompt.tokens, reservation=decision.reservation, admission=admission, budget=budget,
                          ledger=self.ledger, background=self._background)
        if self.journal is not None:
            acct.open_journal(self.journal)
        if decision.slot_taken:
            acct.pending_slot = scheduler.adopt(offer, throttled=decision.throttled)
            acct.hold_slot(acct.pending_slot, scheduler)
        out.settle_before_end(acct.settle_once)  # whatever ends the answer (result, error, in-band failure)
        return acct, decision.throttled

    @staticmethod
    async def _until_disconnect(work, receive, acct: Accounting) -> None:
        """Run `work`, cancelled if the client disconnects before the answer is complete."""
        work = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(receive())
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done() and watcher.done() and watcher.result().get("type") == "http.disconnect" and not acct.completed:
                work.cancel()
            try:
                await work
            except asyncio.CancelledError:
                if not work.cancelled():
                    raise
        finally:
            watcher.cancel()

    def _warn_quota(self, tenant, decision) -> None:
        """80 % of the quota crossed (admission says so once per window): audit and e-mail, off the request path."""
        from asgiref.sync import sync_to_async

        from serving.quota_events import quota_warning_record

        limits = tenant.limits
        task = asyncio.ensure_future(
            sync_to_async(quota_warning_record, thread_sensitive=False)(
                tenant_id=tenant.id, used_tokens=decision.quota_used, quota_tokens=limits.quota_tokens, window=limits.quota_window, mode=limits.quota_mode
            )
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _serve(self, acct: Accounting, plan: Plan, throttled: bool, out: Response) -> None:
        """schedule → call → relay: whatever ends it, the slot is released and the ledger record written."""
        from serving.scheduler import get_scheduler

        scheduler = get_scheduler()
        slot = await self._schedule(scheduler, acct, plan, throttled, out)
        if slot is None:
            return
        try:
            await self._call(acct, plan, out)
        except asyncio.CancelledError:
            acct.cancel()
            raise
        finally:
            await scheduler.release(slot, input_tokens=acct.input_tokens or acct.prompt_estimate, output_tokens=acct.output_tokens,
                                    refund=not acct.backend_accepted)
            acct.record_once()
            self._observe(acct, out)

    async def _schedule(self, scheduler, acct: Accounting, plan: Plan, throttled: bool, out: Response):
        """A fair scheduler slot on the pool, or None after a queue timeout (answered 429 here)."""
        from serving.scheduler import SchedulerTimeout

        if acct.pending_slot is not None:  # taken with the admission
            slot, acct.pending_slot = acct.pending_slot, None
            return slot
        pool = plan.pool
        try:
            slot = await scheduler.acquire(pool_id=pool.id, capacity=pool.capacity, tenant_id=acct.tenant.id, weight=acct.tenant.weight,
                                           input_tokens=acct.prompt_estimate, max_output_tokens=plan.max_tokens,
                                           throttled=throttled, timeout_s=self.settings.queue_timeout_s)
        except SchedulerTimeout:
            err = ApiError(429, f"The model `{acct.model}` is busy: no capacity freed up within {self.settings.queue_timeout_s:.0f} s. "
                                "Try again in a few seconds.", type="rate_limit_error", code="queue_timeout", headers={"retry-after": "5"})
            await self._refuse(out, err, acct.tenant, acct.endpoint)
            return None
        acct.hold_slot(slot, scheduler)
        return slot

    def _observe(self, acct: Accounting, out: Response) -> None:
        label = self.tenant_label(acct.tenant.slug)
        name = acct.endpoint.name
        metrics.REQUESTS.labels(name, str(out.status or 200) if acct.status in ("ok", "error") else acct.status, label).inc()
        metrics.TOKENS_IN.labels(label).inc(acct.input_tokens or 0)
        metrics.TOKENS_OUT.labels(label).inc(acct.output_tokens)
        metrics.LATENCY.labels(name).observe(time.perf_counter() - acct.started_at)
        if acct.ttft_ms is not None:
            metrics.TTFT.labels(name).observe(acct.ttft_ms / 1000)

    async def _call(self, acct: Accounting, plan: Plan, out: Response) -> None:
        """The pool's backends, least loaded first among the healthy ones holding the adapter, failing over until the
        first byte reached the client; then a failure is in-band."""
        pool, adapter = plan.pool, plan.backend_request.adapter  # None for a merged model: any backend of its pool
        driver = driver_for(pool.kind)
        if plan.backend_request.want_tokens:  # TGI token objects say which tokens are special: the model's tokenizer knows
            plan.backend_request.special_ids = special_token_ids(pool.counter)
        tried: set[int] = set()
        last_error: BackendError | None = None
        while (backend := self.health.pick(pool, adapter, tried)) is not None:
            tried.add(backend.id)
            acct.backend_id = backend.id
            try:
                return await self._attempt(driver, backend, acct, plan, out)
            except BackendError as exc:
                if exc.connect:
                    self.health.mark_down(backend.id, exc.message)
                elif exc.error_type == ADAPTER_NOT_LOADED and adapter is not None:
                    self.health.adapter_missing(backend, adapter)  # marked here at once, reloaded off this path
                if out.started:
                    return await self._interrupted(acct, exc, out)
                if not exc.retryable:
                    return await self._backend_refused(acct, exc, plan.max_tokens, out)
                last_error = exc
                log.info("request %s: backend %s failed before the first byte (%s); failing over", acct.request_id, backend.url, exc.message)
        await self._no_backend(acct, adapter, last_error, out)

    async def _attempt(self, driver, backend, acct: Accounting, plan: Plan, out: Response) -> None:
        """One backend's answer, relayed in the client's protocol and mode; raises BackendError."""
        state = self.health.state(backend.id)
        state.in_flight += 1
        stream = driver.stream(self.session, backend.url, plan.backend_request)
        try:
            await relay_for(acct, plan.req, out).run(stream)
        finally:
            state.in_flight -= 1
            await stream.aclose()

    async def _no_backend(self, acct: Accounting, adapter: str | None, last_error: BackendError | None, out: Response) -> None:
        """Nothing could serve it (nothing reached the client, nothing is charged: no backend accepted it)."""
        healthy = [b for b in acct.pool.backends if self.health.state(b.id).healthy]
        if last_error is not None and not last_error.connect and last_error.status == 429:
            message = f"All backends for `{acct.model}` are overloaded; try again in a few seconds."
        elif adapter is not None and any(adapter in b.loaded_adapters for b in healthy) \
                and not any(self.health.holds(b, adapter) for b in healthy):
            # Its backends forgot it (restarted): being reloaded now (serving.health), never the backend's own words.
            return await out.error(ApiError(503, f"The model `{acct.model}` is being loaded again on its backends (one restarted); "
                                                 f"try again in a few seconds.", type="service_unavailable", code="adapter_not_loaded",
                                            headers={"retry-after": str(ADAPTER_RETRY_AFTER_S)}))
        elif adapter is not None and not any(adapter in b.loaded_adapters for b in healthy):
            message = f"No healthy backend holds `{acct.model}` right now; try again in a few seconds."
        else:
            message = f"No healthy backend for model `{acct.model}` right now; try again in a few seconds."
        await out.error(ApiError(503, message, type="service_unavailable", code="no_healthy_backend", headers={"retry-after": "2"}))

    async def _backend_refused(self, acct: Accounting, exc: BackendError, max_tokens: int, out: Response) -> None:
        if exc.status in (400, 422):  # the backend's validation: a prompt (+ max tokens) beyond the context, mostly
            overflow = context_overflow(exc.message)
            if overflow is not None:
                err = context_length_exceeded(acct.endpoint, overflow, max_tokens)
            else:
                err = ApiError(400, exc.message, code="invalid_request")
        else:
            # The backend's own words (its addresses, model ids) stay in the log, for staff.
            log.warning("request %s: backend %s answered %s: %s", acct.request_id, acct.backend_id, exc.status, exc.message)
            what = "sent an unreadable answer" if exc.error_type == "protocol" else f"failed to answer (its status {exc.status})"
            err = ApiError(502, f"The model's backend {what}; try again. If it persists, tell the platform team the request id.",
                           type="server_error", code="backend_error")
        acct.refund()  # before the error's last byte, where it is settled
        await out.error(err)

    async def _interrupted(self, acct: Accounting, exc: BackendError, out: Response) -> None:
        """The stream had started: tell the client in-band, record what was delivered."""
        log.warning("request %s: backend %s failed mid-answer after %s tokens: %s", acct.request_id, acct.backend_id,
                    acct.output_tokens, exc.message)
        message = f"The model's backend failed mid-answer after {acct.output_tokens} tokens; the answer is incomplete."
        acct.interrupt()
        await out.stream_error(message, code="backend_interrupted", tgi_type="incomplete_generation")
