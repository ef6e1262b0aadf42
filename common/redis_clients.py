"""The platform's Redis clients: one place that decides how a process talks to Redis.

Every client fails fast and never retries by itself — the caller falls back (in-process admission, the last config
snapshot), defers (the ledger spool) or answers 503 — so a paused Redis costs a request at most its timeout.

- `sync_client(url)`: for Django views, Celery tasks and the config poller's threads; one per URL, timeout and
  decoding per process (redis-py's client is thread-safe: its pool hands each thread a connection).
- `async_client(url)`: for the gateway's event loop (admission, scheduler); a blocking pool (at most
  `max_connections`; a request waits up to 2 s for one) so a burst cannot open connections without bound.
  Connecting gets 2 s: opening 60 connections at once to a Redis busy with a burst's scripts took more than 0.5 s
  in CI, which put a healthy Redis down as an outage (hard quotas: every request a 503).
"""

from __future__ import annotations

import threading

COMMAND_TIMEOUT_S = 0.5  # a healthy Redis answers in well under a millisecond here
CONNECT_TIMEOUT_S = 2.0

_lock = threading.Lock()
_sync: dict[tuple, object] = {}


def sync_client(url: str, *, timeout_s: float = COMMAND_TIMEOUT_S, decode_responses: bool = False):
    """The process's client for `url` (created once)."""
    key = (url, timeout_s, decode_responses)
    client = _sync.get(key)
    if client is None:
        import redis

        with _lock:
            client = _sync.get(key)
            if client is None:
                client = _sync[key] = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                                           socket_connect_timeout=min(timeout_s, CONNECT_TIMEOUT_S),
                                                           decode_responses=decode_responses)
    return client


def async_client(url: str, *, max_connections: int = 32):
    """A new asyncio client for the calling event loop (asyncio connections cannot be shared across loops)."""
    import redis.asyncio as aioredis

    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=CONNECT_TIMEOUT_S, socket_timeout=COMMAND_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S, decode_responses=True)
    return aioredis.Redis(connection_pool=pool)


def where(client) -> str:
    """Redis's host, port and database, for logs (the URL may hold a password)."""
    kwargs = client.connection_pool.connection_kwargs
    place = f"unix:{kwargs['path']}" if "path" in kwargs else f"{kwargs.get('host')}:{kwargs.get('port')}"
    return f"{place}/{kwargs.get('db', 0)}"
