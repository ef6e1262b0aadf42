"""One server's shared state: the engine, admission (overload and injected faults) and the counters.

The counters and faults exist so tests can see what a gateway sent and break the backend on purpose;
they are exposed only under /_dev/.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator

from aiohttp import web

from .config import BackendConfig
from .protocol import BackendError, Cancellation, Engine, validation_error

_FAULT_KEYS = {"die_after_tokens", "status", "count", "delay_ms", "token_delay_ms", "health"}


@dataclass
class Faults:
    die_after_tokens: int | None = None  # abort the connection after this many tokens (every request)
    status: int | None = None  # answer the next `count` generation requests with this status
    count: int = 0
    delay_ms: float = 0.0  # wait before generating (looks like queue time)
    token_delay_ms: float = 0.0  # wait between tokens (a slow backend)
    health: bool = True

    def update(self, changes: dict) -> None:
        unknown = set(changes) - _FAULT_KEYS
        if unknown:
            raise validation_error(f"unknown fault(s): {sorted(unknown)}; known: {sorted(_FAULT_KEYS)}")
        for key, value in changes.items():
            setattr(self, key, value)
        if "status" in changes and "count" not in changes:
            self.count = 1

    def take_status(self) -> int | None:
        if self.status and self.count > 0:
            self.count -= 1
            return self.status
        return None


@dataclass
class Stats:
    requests_started: int = 0
    requests_completed: int = 0
    requests_cancelled: int = 0  # the client went away before the answer was complete
    requests_failed: int = 0  # validation, overload, injected status, generation errors
    requests_aborted: int = 0  # by the die_after_tokens fault
    in_flight: int = 0
    max_in_flight: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    adapter_requests: Counter = field(default_factory=Counter)  # adapter actually served; the base under its id
    cache_salts: set = field(default_factory=set)
    last_request: dict | None = None

    def as_json(self) -> dict:
        data = asdict(self)
        data["adapter_requests"] = dict(self.adapter_requests)
        data["cache_salts"] = len(self.cache_salts)
        return data


class Ticket:
    """One admitted request: its cancellation, and how it ended."""

    def __init__(self, request: web.BaseRequest):
        self._request = request
        self.cancel = Cancellation(self._connection_closed)
        self.finished = False
        self.aborted = False

    def _connection_closed(self) -> bool:
        """Read from the engine's worker thread too: a client gone without a write is still noticed."""
        transport = self._request.transport
        return transport is None or transport.is_closing()

    def abort_connection(self) -> None:
        """Close the TCP connection without a proper end, as a crashed backend would."""
        self.aborted = True
        self.cancel.set()
        if self._request.transport is not None:
            self._request.transport.abort()


class Backend:
    def __init__(self, config: BackendConfig, engine: Engine):
        self.config = config
        self.engine = engine
        self.stats = Stats()
        self.faults = Faults()

    def record(self, path: str, body: dict, cache_salt: str | None = None) -> None:
        self.stats.requests_started += 1
        self.stats.last_request = {"path": path, "body": body}
        if cache_salt is not None:
            self.stats.cache_salts.add(cache_salt)

    def served_name(self, adapter: str | None) -> str:
        return adapter or self.engine.model_id

    @contextlib.asynccontextmanager
    async def admit(self, request: web.BaseRequest, adapter: str | None) -> AsyncIterator[Ticket]:
        """Injected status, then overload (429), then the injected delay; counts how the request ended."""
        stats = self.stats
        status = self.faults.take_status()
        if status:
            stats.requests_failed += 1
            raise BackendError(status, f"injected fault: status {status}", "injected")
        if stats.in_flight >= self.config.max_concurrent_requests:
            stats.requests_failed += 1
            raise BackendError(429, "Model is overloaded", "overloaded")
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        stats.adapter_requests[self.served_name(adapter)] += 1
        if stats.last_request is not None:
            stats.last_request["adapter"] = self.served_name(adapter)
        ticket = Ticket(request)
        failed = False
        try:
            if self.faults.delay_ms:
                await asyncio.sleep(self.faults.delay_ms / 1000)
            yield ticket
        except ConnectionError:  # the client went away while we wrote: counted as cancelled below
            pass
        except Exception:
            failed = True
            raise
        finally:
            ticket.cancel.set()
            stats.in_flight -= 1
            if failed:
                stats.requests_failed += 1
            elif ticket.finished:
                stats.requests_completed += 1
            elif ticket.aborted:
                stats.requests_aborted += 1
            else:
                stats.requests_cancelled += 1
