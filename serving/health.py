"""Backend health and load, in the gateway process.

A background task GETs every enabled backend's `/health` every few seconds; a backend that fails leaves
the rotation (a connect error on a real request takes it out at once) and comes back when a check passes.
Health is written to the Backend rows now and then, off the request path, for the admin.
`pick()` chooses the least-loaded healthy backend (in-flight / max concurrency) that holds the adapter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BackendState:
    healthy: bool = True
    in_flight: int = 0
    last_error: str = ""
    checked_at: float = 0.0
    dirty: bool = True  # changed since last persisted


class HealthMonitor:
    def __init__(self, store, *, interval_s: float = 2.0, timeout_s: float = 2.0, persist_s: float = 10.0):
        self.store = store  # serving.config.ConfigStore
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.persist_s = persist_s
        self.states: dict[int, BackendState] = {}
        self._task: asyncio.Task | None = None
        self._last_persist = 0.0

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
            if not st.healthy:
                continue
            load = st.in_flight / b.max_concurrency
            if best is None or load < best_load:
                best, best_load = b, load
        return best

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
        backends = list(snapshot.backends())
        await asyncio.gather(*(self._check(session, b) for b in backends))

    async def _check(self, session: aiohttp.ClientSession, backend) -> None:
        try:
            async with session.get(backend.url + "/health", timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                await resp.read()
                ok = resp.status == 200
                self._mark(backend.id, ok, "" if ok else f"/health answered {resp.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self._mark(backend.id, False, f"/health failed: {exc.__class__.__name__} {exc}"[:300])

    def start(self, session: aiohttp.ClientSession) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(session), name="backend-health")

    async def stop(self) -> None:
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
