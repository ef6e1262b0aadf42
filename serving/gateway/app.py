"""The inference gateway: a raw ASGI application (no Django request cycle) for the inference paths.

Request path (docs/gateway.md): read the body (capped) → authenticate the bearer key against the in-memory
snapshot → validate → route `model` to (pool, adapter) → admission (limits, quota) → fair scheduler slot →
pick the least-loaded healthy backend holding the adapter → stream through the driver, failing over before
the first byte → answer in the client's shape → admission settlement, then the ledger record (both awaited
before the last byte, so a client that waits for its answer never finds it still counted against its limits).

Every admitted request is in the process's journal (serving/journal.py) from admission until it is recorded
and settled, with the tokens delivered so far, so that a crash of the process loses no billed usage: another
gateway process on the host (or this one's successor) turns what it finds there into ledger records.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time

import aiohttp
from django.utils import timezone

from serving.config import INFERENCE_SCOPE, ConfigStore, Snapshot
from serving.drivers import BackendError, driver_for
from serving.drivers.base import ADAPTER_NOT_LOADED, context_overflow, special_token_ids
from serving.gateway import metrics
from serving.gateway.accounting import Accounting
from serving.gateway.endpoints import METRICS, MODEL, MODEL_PREFIX, MODELS, ROUTES, Endpoint, endpoint_for
from serving.gateway.errors import ApiError, context_length_exceeded
from serving.gateway.parsing import (
    build_backend_request,
    count_prompt,
    fit_context,
    parse_json,
    parse_request,
    reservation_tokens,
    resolve_max_tokens,
)
from serving.gateway.relays import relay_for
from serving.gateway.response import Response
from serving.gateway.settings import GatewaySettings
from serving.health import HealthMonitor
from serving.journal import SCAN_S as JOURNAL_SCAN_S
from serving.journal import Journal, adopt_dead
from serving.ledger import Ledger
from tenants.api_refusals import EXPIRED_KEY, INVALID_KEY, MISSING_KEY, tenant_suspended
from tenants.services import PLAYGROUND_PREFIX, playground_token_verify, split_key

log = logging.getLogger(__name__)

# "tgi": TGI's own placeholder; "dummy": what huggingface_hub's InferenceClient(model=<url>).chat_completion() sends.
DEFAULT_MODEL_NAMES = {None, "", "default", "tgi", "dummy"}
NOT_DEPLOYED_HINT = " A fine-tuned model answers only once it is deployed (console: Fine-tuning › Adapters)."
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,48}$")
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
ADAPTER_RETRY_AFTER_S = 3  # a forgotten adapter is reloaded within a health round and a LoRA load (about a second)


def is_gateway_path(scope) -> bool:
    """True for the paths the gateway serves (portal.asgi dispatches them before Django)."""
    path = scope["path"]
    return path in ROUTES or path.startswith("/v1/models/") or (path == "/" and scope.get("method") == "POST")


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
        """(key entry, tenant entry) for the bearer key, or ApiError 401/403. No database access."""
        auth = self._header(scope, b"authorization")
        if not auth or not auth[:7].lower() == "bearer ":
            raise ApiError.refusing(MISSING_KEY)
        raw = auth[7:].strip()
        if raw.startswith(PLAYGROUND_PREFIX):
            return None, self._playground_tenant(raw, snap)
        parts = split_key(raw)
        entry = snap.keys.get(parts[0]) if parts else None
        if entry is None or not hmac.compare_digest(entry.secret_hash, hashlib.sha256(parts[1].encode()).hexdigest()):
            raise ApiError.refusing(INVALID_KEY)
        if entry.expires_at is not None and entry.expires_at <= timezone.now():
            raise ApiError.refusing(EXPIRED_KEY)
        tenant = snap.tenants.get(entry.tenant_id)
        if tenant is None:
            raise ApiError(401, "Invalid API key.", type="invalid_request_error", code="invalid_api_key")
        if INFERENCE_SCOPE not in entry.scopes:
            raise ApiError(403, "This API key does not have the `inference` scope.", type="permission_error", code="insufficient_scope")
        self._check_active(tenant)
        self.store.note_key_used(entry.id)
        return entry, tenant

    @staticmethod
    def _check_active(tenant) -> None:
        if not tenant.active:
            raise ApiError.refusing(tenant_suspended(tenant.slug, tenant.suspended_reason, disabled="inference"))

    def _playground_tenant(self, raw: str, snap: Snapshot):
        """The console playground's signed, hour-long token (tenants.services.playground_token_issue)."""
        ids = playground_token_verify(raw)
        tenant = snap.tenants.get(ids[0]) if ids else None
        if tenant is None or ids[1] not in tenant.playground_users:  # removed, demoted or deactivated since
            raise ApiError(401, "The playground session has expired: reload the page.", type="invalid_request_error", code="invalid_api_key")
        self._check_active(tenant)
        return tenant

    @staticmethod
    def _route(tenant, name: str | None):
        if name in DEFAULT_MODEL_NAMES:
            name = tenant.default_model
            if not name:
                bases = [r for r in tenant.models.values() if r.adapter is None]
                if len(bases) != 1:
                    raise ApiError(404, "No model given and no default model set: pass `model` (see GET /v1/models).",
                                   param="model", code="model_not_found")
                return bases[0]
        route = tenant.models.get(name)
        if route is None:
            hint = NOT_DEPLOYED_HINT if isinstance(name, str) and name.startswith("ft:") else ""
            raise ApiError(404, f"The model `{name}` does not exist or you do not have access to it.{hint}", param="model",
                           code="model_not_found")
        return route

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

    # ---- inference ----------------------------------------------------------------------------------

    async def _inference(self, scope, receive, out: Response) -> None:
        started_at = time.perf_counter()
        given_id = self._header(scope, b"x-request-id")
        echo_id = given_id if given_id and REQUEST_ID_RE.match(given_id) else None
        # The ledger id is unique per request even when a client reuses its x-request-id (else a reused id
        # would make ignore_conflicts drop the later requests' usage).
        request_id = f"{echo_id}~{secrets.token_hex(6)}" if echo_id else secrets.token_hex(12)
        out.headers = {"x-request-id": echo_id or request_id}
        endpoint, tenant = out.endpoint, None
        try:
            body = await self._read_body(scope, receive)
            snap = self.store.snapshot
            key, tenant = self._authenticate(scope, snap)
            data = parse_json(body)
            endpoint = endpoint.resolve(data)  # TGI's POST /: `stream` picks the route
            req = parse_request(endpoint, data)
            route = self._route(tenant, req.model)
            pool = snap.pools[route.pool_id]
            if route.adapter is not None and not any(route.adapter in b.loaded_adapters for b in pool.backends):
                raise ApiError(503, f"The model `{route.name}` is deployed but not loaded on any backend yet (loading, or "
                                    "awaiting a backend restart). Try again later.", code="adapter_not_loaded", headers={"retry-after": "30"})
            max_tokens = resolve_max_tokens(req, tenant, pool.context_length)
            backend_request = build_backend_request(req, tenant, route, pool, max_tokens)
            # The prompt as the backend counts it: exact with the model's tokenizer, else a bound (docs/limits.md).
            prompt = await count_prompt(backend_request, pool)
            max_tokens = fit_context(req, backend_request, prompt, pool.context_length)
        except asyncio.CancelledError:
            return  # the client left while sending its body
        except ApiError as err:
            return await self._refuse(out, err, tenant, endpoint)

        from serving.admission import get_admission

        admission = get_admission()
        decision = await admission.admit(tenant.limits, request_id=request_id,
                                         reserve_tokens=reservation_tokens(prompt, max_tokens, pool.context_length))
        out.headers = {**out.headers, **decision.headers}
        if decision.warn:
            self._warn_quota(tenant, decision)
        if not decision.allowed:
            err = ApiError(decision.status, decision.message, type=decision.error_type or None, code=decision.code or None,
                           headers={"retry-after": str(decision.retry_after)} if decision.retry_after else None)
            return await self._refuse(out, err, tenant, endpoint)

        acct = Accounting(request_id=request_id, endpoint=endpoint, tenant=tenant, key_id=key.id if key else None, model=route.name,
                          adapter=route.adapter or "", pool=pool, started_at=started_at, prompt_estimate=prompt.tokens,
                          reservation=decision.reservation, admission=admission, ledger=self.ledger, background=self._background)
        if self.journal is not None:
            acct.open_journal(self.journal)
        out.settle_before_end(acct.settle_once)  # whatever ends the answer (result, error, in-band failure)
        try:
            await self._until_disconnect(self._serve(acct, req, route, backend_request, decision, max_tokens, out), receive, acct)
        finally:
            await acct.close()  # the client left, or nothing was sent: settled now

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

    async def _serve(self, acct: Accounting, req, route, backend_request, decision, max_tokens: int, out: Response) -> None:
        from serving.scheduler import SchedulerTimeout, get_scheduler

        pool = acct.pool
        scheduler = get_scheduler()
        try:
            slot = await scheduler.acquire(pool_id=pool.id, capacity=pool.capacity, tenant_id=acct.tenant.id, weight=acct.tenant.weight,
                                           input_tokens=acct.prompt_estimate, max_output_tokens=max_tokens,
                                           throttled=decision.throttled, timeout_s=self.settings.queue_timeout_s)
        except SchedulerTimeout:
            err = ApiError(429, f"The model `{acct.model}` is busy: no capacity freed up within {self.settings.queue_timeout_s:.0f} s. "
                                "Try again in a few seconds.", type="rate_limit_error", code="queue_timeout", headers={"retry-after": "5"})
            return await self._refuse(out, err, acct.tenant, acct.endpoint)
        acct.hold_slot(slot)
        try:
            await self._run_backends(acct, req, route, backend_request, max_tokens, out)
        except asyncio.CancelledError:
            acct.cancel()
            raise
        finally:
            await scheduler.release(slot, input_tokens=acct.input_tokens or acct.prompt_estimate, output_tokens=acct.output_tokens,
                                    refund=not acct.backend_accepted)
            acct.record_once()
            self._observe(acct, out)

    def _observe(self, acct: Accounting, out: Response) -> None:
        label = self.tenant_label(acct.tenant.slug)
        name = acct.endpoint.name
        metrics.REQUESTS.labels(name, str(out.status or 200) if acct.status in ("ok", "error") else acct.status, label).inc()
        metrics.TOKENS_IN.labels(label).inc(acct.input_tokens or 0)
        metrics.TOKENS_OUT.labels(label).inc(acct.output_tokens)
        metrics.LATENCY.labels(name).observe(time.perf_counter() - acct.started_at)
        if acct.ttft_ms is not None:
            metrics.TTFT.labels(name).observe(acct.ttft_ms / 1000)

    async def _run_backends(self, acct: Accounting, req, route, backend_request, max_tokens: int, out: Response) -> None:
        pool = acct.pool
        driver = driver_for(pool.kind)
        if backend_request.want_tokens:  # TGI token objects say which tokens are special: the model's tokenizer knows
            backend_request.special_ids = special_token_ids(pool.counter)
        tried: set[int] = set()
        last_error: BackendError | None = None
        while True:
            backend = self.health.pick(pool, route.adapter, tried)
            if backend is None:
                break
            tried.add(backend.id)
            acct.backend_id = backend.id
            state = self.health.state(backend.id)
            state.in_flight += 1
            stream = driver.stream(self.session, backend.url, backend_request)
            try:
                await relay_for(acct, req, out).run(stream)
                return
            except BackendError as exc:
                if exc.connect:
                    self.health.mark_down(backend.id, exc.message)
                elif exc.error_type == ADAPTER_NOT_LOADED and route.adapter is not None:
                    self.health.adapter_missing(backend, route.adapter)  # marked here at once, reloaded off this path
                if out.started:
                    return await self._interrupted(acct, exc, out)
                if exc.retryable:
                    last_error = exc
                    log.info("request %s: backend %s failed before the first byte (%s); failing over", acct.request_id, backend.url, exc.message)
                    continue
                return await self._backend_refused(acct, exc, max_tokens, out)
            finally:
                state.in_flight -= 1
                await stream.aclose()
        await self._no_backend(acct, route, last_error, out)

    async def _no_backend(self, acct: Accounting, route, last_error: BackendError | None, out: Response) -> None:
        """Nothing could serve it (nothing reached the client, nothing is charged: no backend accepted it)."""
        healthy = [b for b in acct.pool.backends if self.health.state(b.id).healthy]
        if last_error is not None and not last_error.connect and last_error.status == 429:
            message = f"All backends for `{acct.model}` are overloaded; try again in a few seconds."
        elif route.adapter is not None and any(route.adapter in b.loaded_adapters for b in healthy) \
                and not any(self.health.holds(b, route.adapter) for b in healthy):
            # Its backends forgot it (restarted): being reloaded now (serving.health), never the backend's own words.
            return await out.error(ApiError(503, f"The model `{acct.model}` is being loaded again on its backends (one restarted); "
                                                 f"try again in a few seconds.", type="service_unavailable", code="adapter_not_loaded",
                                            headers={"retry-after": str(ADAPTER_RETRY_AFTER_S)}))
        elif route.adapter is not None and not any(route.adapter in b.loaded_adapters for b in healthy):
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
