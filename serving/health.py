"""Backend health, load and adapters, in the gateway process.

A background task GETs every enabled backend's `/health` every few seconds; a backend that fails leaves
the rotation (a connect error on a real request takes it out at once) and comes back when a check passes.
Health is written to the Backend rows now and then, off the request path, for the admin.
`pick()` chooses the least-loaded healthy backend (in-flight / max concurrency) that holds the adapter.

Adapters: a dev / vLLM backend forgets its runtime-loaded adapters when it restarts, while `loaded_adapters` still
lists them. Each round also reads `/v1/models` of such a backend that lists adapters, and a request answered 404 for
its adapter (`adapter_not_loaded`) says the same at once: the adapter is marked missing on that backend in this process
(`pick()` skips it there, the request tries another backend), and a reload task asks the backend for every adapter it
should hold (serving.adapter_loads), off the request path, within a round of the backend being healthy again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp

log = logging.getLogger(__name__)
RUNTIME_KINDS = ("dev", "vllm")  # serving.adapter_loads.RUNTIME_KINDS (not imported: no Django models at import)
RELOAD_RETRY_S = 10.0  # a reload that left the same adapters missing is tried again after this long
LOAD_TIMEOUT_S = 60.0


@dataclass(slots=True)
class BackendState:
    healthy: bool = True
    in_flight: int = 0
    last_error: str = ""
    checked_at: float = 0.0
    dirty: bool = True  # changed since last persisted
    missing: set = field(default_factory=set)  # adapters it listed but does not hold now (restarted): not routed there
    reloading: bool = False
    reloaded: tuple = ((), 0.0)  # (the missing adapters the last reload was for, when it ended)


class HealthMonitor:
    def __init__(self, store, *, interval_s: float = 2.0, timeout_s: float = 2.0, persist_s: float = 10.0):
        self.store = store  # serving.config.ConfigStore
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.persist_s = persist_s
        self.states: dict[int, BackendState] = {}
        self._task: asyncio.Task | None = None
        self._last_persist = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._reloads: set[asyncio.Task] = set()  # adapter reloads in progress, kept alive until done

    def state(self, backend_id: int) -> BackendState:
        st = self.states.get(backend_id)
        if st is None:
            st = self.states[backend_id] = BackendState()
        return st

    def pick(self, pool, adapter: str | None, exclude: set[int]):
        """The least-loaded healthy backend of the pool that holds `adapter`, or None."""
        best, best_load = None, None
        for b in pool.backends:
            if b.id in exclude or (adapter is not None and adapter not in b.loaded_adapters):
                continue
            st = self.state(b.id)
            if not st.healthy or adapter in st.missing:
                continue
            load = st.in_flight / b.max_concurrency
            if best is None or load < best_load:
                best, best_load = b, load
        return best

    def holds(self, backend, adapter: str) -> bool:
        """The backend lists the adapter and has not been found without it since (a restart)."""
        return adapter in backend.loaded_adapters and adapter not in self.state(backend.id).missing

    def adapter_missing(self, backend, adapter: str) -> None:
        """A request found `adapter` unknown to `backend`: stop routing it there and reload it, off the request path."""
        st = self.state(backend.id)
        if adapter not in st.missing:
            log.warning("backend %s does not hold adapter %s (restarted?); routing it elsewhere and reloading it", backend.url, adapter)
            st.missing.add(adapter)
        self._request_reload(backend)

    def mark_down(self, backend_id: int, error: str) -> None:
        st = self.state(backend_id)
        if st.healthy:
            log.warning("backend %s out of rotation: %s", backend_id, error)
        st.healthy, st.last_error, st.dirty = False, error[:300], True

    def _mark(self, backend_id: int, healthy: bool, error: str) -> None:
        st = self.state(backend_id)
        if st.healthy != healthy or st.last_error != error:
            st.dirty = True
            if healthy and not st.healthy:
                log.info("backend %s back in rotation", backend_id)
        st.healthy, st.last_error, st.checked_at = healthy, error[:300], time.time()

    async def check_all(self, session: aiohttp.ClientSession) -> None:
        snapshot = self.store.snapshot
        if snapshot is None:
            return
        self._session = session
        await asyncio.gather(*(self._check(session, b, snapshot.pools[b.pool_id].kind) for b in snapshot.backends()))

    async def _check(self, session: aiohttp.ClientSession, backend, kind: str = "") -> None:
        try:
            async with session.get(backend.url + "/health", timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                await resp.read()
                ok = resp.status == 200
                self._mark(backend.id, ok, "" if ok else f"/health answered {resp.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self._mark(backend.id, False, f"/health failed: {exc.__class__.__name__} {exc}"[:300])
            return
        if ok and kind in RUNTIME_KINDS and backend.loaded_adapters:
            served = await self._served(session, backend)
            if served is not None:
                st = self.state(backend.id)
                st.missing = set(backend.loaded_adapters) - served
                if st.missing:
                    self._request_reload(backend)

    async def _served(self, session: aiohttp.ClientSession, backend) -> set[str] | None:
        """The model ids a dev / vLLM backend serves now (base model and loaded adapters), or None if it cannot say."""
        try:
            async with session.get(backend.url + "/v1/models", timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                if resp.status != 200:
                    return None
                return {m["id"] for m in (await resp.json(content_type=None))["data"]}
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError, TypeError):
            return None

    # ---- reloading what a backend forgot -----------------------------------------------------------------------

    def _request_reload(self, backend) -> None:
        st = self.state(backend.id)
        last_missing, last_end = st.reloaded
        if st.reloading or self._session is None or (last_missing == frozenset(st.missing) and time.monotonic() - last_end < RELOAD_RETRY_S):
            return
        st.reloading = True
        task = asyncio.get_running_loop().create_task(self._reload(self._session, backend), name=f"adapter-reload-{backend.id}")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload(self, session: aiohttp.ClientSession, backend) -> None:
        """Ask `backend` for every adapter it should hold and does not serve; record what it did (Backend and deployment
        rows: every gateway's snapshot follows), and route what it took again at once in this process."""
        from serving.adapter_loads import load_outcome

        st = self.state(backend.id)
        try:
            loads = await asyncio.to_thread(expected_loads, backend.id)
            served = await self._served(session, backend) or set()
            holding, refused = [load.name for load in loads if load.name in served], {}
            for load in loads:
                if load.name in served:
                    continue
                try:
                    async with session.post(backend.url + "/v1/load_lora_adapter", json={"lora_name": load.name, "lora_path": load.path},
                                            timeout=aiohttp.ClientTimeout(total=LOAD_TIMEOUT_S)) as resp:
                        ok, message = resp.status < 400, (await resp.text())[:300]
                        message = message if ok else f"HTTP {resp.status}: {message}"
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    ok, message = False, f"unreachable: {exc.__class__.__name__} {exc}"
                outcome = load_outcome(ok, message)
                if outcome == "loaded":
                    holding.append(load.name)
                elif outcome == "refused":
                    refused[load.name] = message
                log.log(logging.INFO if outcome == "loaded" else logging.WARNING, "reloading adapter %s on %s: %s",
                        load.name, backend.url, outcome if outcome == "loaded" else message)
            expected = {load.name for load in loads}
            st.missing -= set(holding)
            await asyncio.to_thread(record_loads, backend.id, holding, refused,
                                    [n for n in backend.loaded_adapters if n not in expected])
        except Exception:
            log.exception("reloading the adapters of backend %s failed", backend.url)
        finally:
            st.reloading = False
            st.reloaded = (frozenset(st.missing), time.monotonic())

    def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(session), name="backend-health")

    async def stop(self) -> None:
        for task in list(self._reloads):
            task.cancel()
        self._session = None
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        await self._persist()

    async def _run(self, session: aiohttp.ClientSession) -> None:
        while True:
            try:
                await self.check_all(session)
                if time.monotonic() - self._last_persist >= self.persist_s:
                    await self._persist()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("backend health check round failed")
            await asyncio.sleep(self.interval_s)

    async def _persist(self) -> None:
        self._last_persist = time.monotonic()
        changes = {bid: (st.healthy, st.last_error, st.checked_at) for bid, st in self.states.items() if st.dirty or st.checked_at}
        for st in self.states.values():
            st.dirty = False
        if changes:
            try:
                await asyncio.to_thread(persist_health, changes)
            except Exception:
                log.exception("could not persist backend health")


def persist_health(changes: dict[int, tuple[bool, str, float]]) -> None:
    """Write health to Backend rows with update() (no signals: this must not bump the config version)."""
    from datetime import datetime, timezone

    from django.db import close_old_connections

    from serving.models import Backend

    close_old_connections()
    try:
        for backend_id, (healthy, error, checked_at) in changes.items():
            Backend.objects.filter(pk=backend_id).update(
                healthy=healthy, last_error=error,
                last_checked_at=datetime.fromtimestamp(checked_at, timezone.utc) if checked_at else None,
            )
    finally:
        close_old_connections()


def expected_loads(backend_id: int) -> list:
    """serving.adapter_loads.adapters_expected for one backend (a thread of the gateway; never per request)."""
    from django.db import close_old_connections

    from serving.adapter_loads import adapters_expected
    from serving.models import Backend

    close_old_connections()
    try:
        backend = Backend.objects.select_related("pool").filter(pk=backend_id).first()
        return adapters_expected(backend) if backend is not None else []
    finally:
        close_old_connections()


def record_loads(backend_id: int, holding: list[str], refused: dict[str, str], dropped: list[str]) -> None:
    """serving.adapter_loads.record_backend_adapters from a thread of the gateway."""
    from django.db import close_old_connections

    from serving.adapter_loads import record_backend_adapters

    close_old_connections()
    try:
        record_backend_adapters(backend_id, holding=holding, refused=refused, dropped=dropped)
    finally:
        close_old_connections()
