"""The platform's Redis clients: one place that decides how a process talks to Redis.

Every client fails fast and never retries by itself — the caller falls back (in-process admission, the last config
snapshot), defers (the ledger spool) or answers 503 — so a paused Redis costs a request at most its timeout.

- `sync_client(url)`: for Django views, Celery tasks and the config poller's threads; one per URL, timeout and
  decoding per process (redis-py's client is thread-safe: its pool hands each thread a connection).
- `async_client(url)`: redis-py's asyncio client for the gateway's event loop (budgets, the lease keeper, admission's
  console snapshot); a blocking pool (at most `max_connections`; a request waits up to 2 s for one) so a burst cannot
  open connections without bound. Connecting gets 2 s: opening 60 connections at once to a Redis busy with a burst's
  scripts took more than 0.5 s in CI, which put a healthy Redis down as an outage (hard quotas: every request a 503).
- `pipelined_client(url)`: the gateway's per-request calls (admission and its settle, the scheduler's slots) on one
  connection per event loop, every caller's command written at once and the replies matched in order
  (`PipelinedClient`): a call costs a fifth to a tenth of the CPU of redis-py's pooled one, and a burst waits for no
  connection. Its errors are redis-py's, so callers handle both alike.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
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


# ---- the gateway's hot path: one pipelined connection per event loop ------------------------------------------


def pipelined_client(url: str, *, timeout_s: float = COMMAND_TIMEOUT_S):
    """A client for the gateway's per-request scripts (admission and its settle) on the calling event loop: one
    connection, every caller's command written to it at once and the replies matched in order (`PipelinedClient`).
    The same interface (`register_script`, `execute_command`) from redis-py for a URL it does not take (TLS options)."""
    kwargs = _pipelined_kwargs(url)
    if kwargs is None:
        return async_client(url, max_connections=64)
    return PipelinedClient(url, kwargs, timeout_s=timeout_s)


_PIPELINED_KEYS = {"host", "port", "db", "username", "password", "path", "connection_class"}


def _pipelined_kwargs(url: str) -> dict | None:
    """redis-py's reading of `url`, when PipelinedClient can honour all of it (host or socket, database, credentials,
    TLS with the default verification); else None."""
    from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

    kwargs = parse_url(url)
    if not set(kwargs) <= _PIPELINED_KEYS:
        return None
    cls = kwargs.pop("connection_class", None)
    if cls is not None and cls not in (SSLConnection, UnixDomainSocketConnection):
        return None
    kwargs["ssl"] = cls is SSLConnection
    return kwargs


def _encode(arg) -> bytes:
    """An argument as redis-py encodes it (str in UTF-8, numbers by repr); bool and None refused as it refuses them."""
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return repr(arg).encode()
    from redis.exceptions import DataError

    raise DataError(f"Invalid input of type: {type(arg).__name__!r}. Convert to a bytes, string, int or float first.")


try:
    from hiredis import pack_command as _pack_hiredis
except ImportError:  # hiredis is optional, as for redis-py
    _pack_hiredis = None


def pack_command(args) -> bytes:
    """A command in RESP: an array of bulk strings. hiredis's packer (C) when installed — 3.5 µs against 7.8 µs here for
    admission's 33-argument script call — else, and for what hiredis refuses (redis-py's DataError then), Python's."""
    if _pack_hiredis is not None:
        try:
            return _pack_hiredis(args)
        except TypeError:
            pass
    return pack_command_python(args)


def pack_command_python(args) -> bytes:
    """pack_command without hiredis."""
    parts = [b"*%d\r\n" % len(args)]
    append = parts.append
    for arg in args:
        kind = type(arg)  # the common kinds first, without a call
        if kind is str:
            b = arg.encode()
        elif kind is int:
            b = b"%d" % arg
        else:
            b = _encode(arg)
        append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(parts)


class ReplyError(str):
    """An error reply ('-ERR …') as the pure-Python reader returns it (hiredis returns its own ReplyError)."""


class PythonReader:
    """RESP2 replies from a byte stream, as hiredis.Reader(encoding='utf-8') reads them: `feed(data)`, then `gets()`
    until it returns False (no complete reply yet). Used when hiredis is not installed."""

    def __init__(self):
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def gets(self):
        try:
            reply, self._pos = self._parse(self._pos)
        except IndexError:  # incomplete
            return False
        return reply

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._buf.find(b"\r\n", pos)
        if end < 0:
            raise IndexError
        return bytes(self._buf[pos:end]), end + 2

    def _parse(self, pos: int):
        if pos >= len(self._buf):
            raise IndexError
        kind = self._buf[pos]
        line, pos = self._line(pos + 1)
        if kind == 43:  # '+'
            return line.decode(), pos
        if kind == 45:  # '-'
            return ReplyError(line.decode()), pos
        if kind == 58:  # ':'
            return int(line), pos
        if kind == 36:  # '$'
            n = int(line)
            if n < 0:
                return None, pos
            if pos + n + 2 > len(self._buf):
                raise IndexError
            return bytes(self._buf[pos:pos + n]).decode(), pos + n + 2
        if kind == 42:  # '*'
            n = int(line)
            if n < 0:
                return None, pos
            items = []
            for _ in range(n):
                item, pos = self._parse(pos)
                items.append(item)
            return items, pos
        from redis.exceptions import InvalidResponse

        raise InvalidResponse(f"Protocol error: unexpected reply type {chr(kind)!r}")


def _reader():
    try:
        import hiredis
    except ImportError:
        return PythonReader(), ReplyError
    return hiredis.Reader(encoding="utf-8"), hiredis.ReplyError


def _reply_error(text: str):
    """redis-py's exception for an error reply (NoScriptError, ReadOnlyError, OutOfMemoryError, …)."""
    from redis._parsers import BaseParser

    return BaseParser.parse_error(text)


class _Connection(asyncio.Protocol):
    """One connection: commands written as they come, a future per command, replies matched in order. A command not
    answered within the timeout closes the connection (its own and every later caller's: TimeoutError / ConnectionError)."""

    def __init__(self, loop, timeout_s: float):
        self.loop = loop
        self.timeout_s = timeout_s
        self.transport = None
        self.closed = False
        self.reader, self._reply_error_type = _reader()
        self.waiting: collections.deque = collections.deque()  # (future, deadline)
        self._out: list[bytes] = []  # commands not written yet (this turn of the event loop)
        self._timer = None

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        reader, waiting = self.reader, self.waiting
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                future = waiting.popleft()[0]
                if future.done():  # its caller gave up (cancelled): the reply is dropped, the order kept
                    continue
                if isinstance(reply, self._reply_error_type):
                    future.set_exception(_reply_error(str(reply)))
                else:
                    future.set_result(reply)
        except Exception as exc:  # a protocol error (or a reply with no command): the stream cannot be trusted
            from redis.exceptions import ConnectionError

            self._close(ConnectionError(f"Redis answered unreadably: {exc}"))

    def connection_lost(self, exc) -> None:
        from redis.exceptions import ConnectionError

        self._close(ConnectionError(f"Connection to Redis lost: {exc}" if exc else "Connection closed by Redis."))

    # commands
    def send(self, packed: bytes) -> asyncio.Future:
        """Queue a command; the commands of one turn of the event loop go out in one write (one system call)."""
        if self.closed:
            from redis.exceptions import ConnectionError

            raise ConnectionError("Connection to Redis closed.")
        future = self.loop.create_future()
        self.waiting.append((future, self.loop.time() + self.timeout_s))
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(packed)
        if self._timer is None:
            self._timer = self.loop.call_at(self.waiting[0][1], self._check_timeout)
        return future

    def _flush(self) -> None:
        out, self._out = self._out, []
        if not self.closed and out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _check_timeout(self) -> None:
        """One timer per connection, at the oldest unanswered command's deadline (not one per command). A command whose
        caller gave up still waits for its reply (the replies come in order), so it counts too."""
        self._timer = None
        waiting = self.waiting
        if not waiting:
            return
        if waiting[0][1] <= self.loop.time():
            from redis.exceptions import TimeoutError

            return self._close(TimeoutError(f"Timeout reading from Redis ({self.timeout_s} s)"))
        self._timer = self.loop.call_at(waiting[0][1], self._check_timeout)

    def _close(self, exc: BaseException) -> None:
        self.closed = True
        self._out = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self.waiting = self.waiting, collections.deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    @property
    def idle(self) -> bool:
        return not self.waiting


class PipelinedClient:
    """The gateway's per-request Redis calls over one connection of its event loop, pipelined: a command costs a
    write and a future, never a pool's lock, a connection check or a wait for a free connection (redis-py's asyncio
    client spends about 0.1–0.2 ms of CPU a call on those; a burst of 256 requests waited for one of 64 connections).
    Redis runs one command at a time whatever the number of connections, so one loses nothing.

    Errors are redis-py's (ConnectionError, TimeoutError, the error replies' classes), so callers handle them as they
    handle redis-py's. A connection that failed or timed out is closed; the next command opens a new one."""

    def __init__(self, url: str, kwargs: dict, *, timeout_s: float = COMMAND_TIMEOUT_S,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S):
        self.url = url
        self.connection_kwargs = kwargs  # for `where` (and the keeper: see connection_pool)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future | None = None

    @property
    def connection_pool(self):
        """This client, for the Redis keeper (serving/leases.py), which drops idle connections when Redis answers again."""
        return self

    async def disconnect(self, inuse_connections: bool = True) -> None:
        conn = self._conn
        if conn is not None and not conn.closed and (inuse_connections or conn.idle):
            from redis.exceptions import ConnectionError

            conn._close(ConnectionError("Connection to Redis closed by the client."))
        self._conn = None if conn is None or conn.closed else conn

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, future: asyncio.Future) -> None:
        self._connecting = None
        if not future.cancelled() and future.exception() is None:
            self._conn = future.result()

    async def _connect(self) -> _Connection:
        from redis.exceptions import ConnectionError, TimeoutError

        loop = asyncio.get_running_loop()
        kw = self.connection_kwargs
        conn = _Connection(loop, self.timeout_s)
        try:
            if "path" in kw:
                connect = loop.create_unix_connection(lambda: conn, kw["path"])
            else:
                connect = loop.create_connection(lambda: conn, kw.get("host", "localhost"), kw.get("port", 6379),
                                                 ssl=ssl.create_default_context() if kw.get("ssl") else None)
            await asyncio.wait_for(connect, self.connect_timeout_s)
        except asyncio.TimeoutError as exc:
            raise TimeoutError(f"Timeout connecting to Redis at {where(self)}") from exc
        except OSError as exc:
            raise ConnectionError(f"Error connecting to Redis at {where(self)}: {exc}") from exc
        setup = []
        if kw.get("password") is not None:
            setup.append(("AUTH", kw["username"], kw["password"]) if kw.get("username") else ("AUTH", kw["password"]))
        if kw.get("db"):
            setup.append(("SELECT", kw["db"]))
        try:
            for future in [conn.send(pack_command(cmd)) for cmd in setup]:
                await future
        except BaseException:
            conn._close(ConnectionError("Connection to Redis closed: its setup failed."))
            raise
        return conn

    async def execute_command(self, *args):
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connection()
        return await conn.send(pack_command(args))

    def register_script(self, source: str) -> "PipelinedScript":
        return PipelinedScript(self, source)


class PipelinedScript:
    """A Lua script called by its SHA-1 (EVALSHA); sent whole (EVAL, which caches it) when Redis does not know it."""

    def __init__(self, client: PipelinedClient, source: str):
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys=(), args=()):
        from redis.exceptions import NoScriptError

        try:
            return await self.client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.client.execute_command("EVAL", self.source, len(keys), *keys, *args)
