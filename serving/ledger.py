"""The usage ledger writer: one UsageRecord per request, written by group commit.

Requests put their record on an asyncio queue; one writer task takes everything queued, writes it in one
`bulk_create` in a thread, and wakes the waiters. While a batch is being written the next one queues up,
so under load one INSERT carries many records. A completed request awaits its record's flush before its
last byte is sent (the record survives a gateway crash after the answer); failed, interrupted and
cancelled requests submit without waiting. `request_id` is unique and inserts use ignore_conflicts, so a
retried batch never counts a request twice.

When the database refuses a batch RETRIES times, the batch is appended to the local spool
(serving/ledger_spool.py) and fsynced before the waiters wake, so the answer's last byte still follows a
durable record. While this process's spool holds records the database is presumed down: new batches go
straight to the spool instead of waiting for retries. The writer replays the spool at start-up (files of
stopped processes too) and every `replay_interval_s` while one exists; replay inserts the same idempotent
way, so a crash between the insert and the removal of the file counts nothing twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from django.db import connection, transaction
from django.utils import timezone

from serving.ledger_spool import Spool

log = logging.getLogger(__name__)

MAX_BATCH = 500
RETRIES = 3
_REPLAY = object()  # queue item: replay the spool now (queued at start and by the replay timer)


@dataclass(slots=True)
class LedgerEntry:
    request_id: str
    tenant_id: int
    api_key_id: int | None
    endpoint: str
    model: str
    adapter: str
    pool_id: int | None
    backend_id: int | None
    input_tokens: int
    output_tokens: int
    status: str  # ok | error | cancelled | interrupted (UsageRecord.Status)
    ttft_ms: int | None
    duration_ms: int
    created_at: object = field(default=None)


# The spool's JSON form: every field but created_at, with the type a valid record has.
_RECORD_TYPES = {
    **dict.fromkeys(("request_id", "endpoint", "model", "adapter", "status"), str),
    **dict.fromkeys(("tenant_id", "input_tokens", "output_tokens", "duration_ms"), int),
    **dict.fromkeys(("api_key_id", "pool_id", "backend_id", "ttft_ms"), (int, type(None))),
}


def entry_to_record(entry: LedgerEntry, now: datetime) -> dict:
    """The entry as a spool line. created_at is fixed now: a replay hours later must bill the request's day."""
    record = {name: getattr(entry, name) for name in _RECORD_TYPES}
    record["created_at"] = (entry.created_at or now).isoformat()
    return record


def entry_from_record(record: dict) -> LedgerEntry:
    """A spool line back as an entry; ValueError when it is not a valid usage record."""
    for name, kind in _RECORD_TYPES.items():
        value = record.get(name, ...)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"`{name}` is missing or has the wrong type")
    created_at = datetime.fromisoformat(str(record.get("created_at")))
    if created_at.tzinfo is None:
        raise ValueError("`created_at` has no time zone")
    return LedgerEntry(**{name: record[name] for name in _RECORD_TYPES}, created_at=created_at)


# The row's columns (UsageRecord's attribute names): every concrete field but its id; the statement is not built when
# the model has another, so a new field cannot be left unwritten.
_COLUMNS = ("tenant_id", "request_id", "api_key_id", "endpoint", "model", "adapter", "pool_id", "backend_id",
            "input_tokens", "output_tokens", "status", "ttft_ms", "duration_ms", "created_at")
_insert_sql: dict[str, str] = {}  # by database vendor


def _insert_statement() -> str:
    """INSERT … ON CONFLICT (request_id) DO NOTHING for the ledger table, in this connection's dialect (PostgreSQL and
    SQLite both have it; only a duplicate request id is skipped, never a row that breaks another constraint)."""
    sql = _insert_sql.get(connection.vendor)
    if sql is None:
        from serving.models import UsageRecord

        meta, quote = UsageRecord._meta, connection.ops.quote_name
        column_of = {f.attname: f.column for f in meta.concrete_fields if not f.primary_key}
        if set(column_of) != set(_COLUMNS):
            raise RuntimeError(f"serving.ledger writes {sorted(_COLUMNS)} but UsageRecord has {sorted(column_of)}: "
                               "update _COLUMNS and flush_batch together with the model")
        sql = (f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(column_of[name]) for name in _COLUMNS)}) "
               f"VALUES ({', '.join(['%s'] * len(_COLUMNS))}) ON CONFLICT ({quote(column_of['request_id'])}) DO NOTHING")
        _insert_sql[connection.vendor] = sql
    return sql


def flush_batch(entries: list[LedgerEntry]) -> int:
    """Write entries in one transaction (sync; run it in a thread). Idempotent per request_id. Returns the count.

    One prepared INSERT executed for every row, not the ORM's bulk_create: on the gateway's hot path the ORM's model
    instances and SQL compilation cost more than the write itself (docs/benchmarks.md). Each row carries its own
    tenant_id; the values are adapted by the connection's own operations (an aware datetime as the backend stores it)."""
    now = timezone.now()
    adapt_time = connection.ops.adapt_datetimefield_value
    rows = [
        (e.tenant_id, e.request_id, e.api_key_id, e.endpoint, e.model, e.adapter or "", e.pool_id, e.backend_id,
         max(0, e.input_tokens), max(0, e.output_tokens), e.status, e.ttft_ms, max(0, e.duration_ms),
         adapt_time(e.created_at or now))
        for e in entries
    ]
    if len(rows) == 1:  # one statement commits by itself (autocommit): no transaction to open around it
        with connection.cursor() as cursor:
            cursor.execute(_insert_statement(), rows[0])
    else:  # one transaction, one commit, for the batch
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.executemany(_insert_statement(), rows)
    return len(rows)


def _close_connection() -> None:
    connection.close()  # looked up here, on the calling thread: that thread's connection


def _flush_in_thread(entries: list[LedgerEntry]) -> int:
    """Runs on the ledger's own thread, which keeps its database connection open between batches
    (opening one per batch cost ~0.6 ms a request); after an error the connection is dropped and reopened."""
    try:
        return flush_batch(entries)
    except Exception:
        connection.close()
        raise


def _existing_in_thread(request_ids: list[str]) -> dict[str, tuple[int, int, datetime]]:
    from serving.models import UsageRecord

    try:
        # all_tenants: the ids come from one process's journal and belong to many tenants.
        rows = UsageRecord.all_tenants.filter(request_id__in=request_ids).values_list(
            "request_id", "input_tokens", "output_tokens", "created_at")
        return {rid: (i, o, at) for rid, i, o, at in rows}
    except Exception:
        connection.close()
        raise


def _write_recovered_in_thread(entries: list[LedgerEntry]) -> None:
    try:
        flush_batch(_with_live_references(entries))
    except Exception:
        connection.close()
        raise


def _with_live_references(entries: list[LedgerEntry]) -> list[LedgerEntry]:
    """Spooled records can be hours old. A key, pool or backend deleted since becomes NULL (what SET_NULL would
    have done to a row written in time), so one such record cannot block the replay. A record whose tenant is
    gone has nobody to bill: it is logged in full and dropped."""
    from serving.models import Backend, BackendPool
    from tenants.models import ApiKey, Tenant

    def live(manager, attr: str) -> set[int]:
        ids = {getattr(e, attr) for e in entries} - {None}
        return set(manager.filter(id__in=ids).values_list("id", flat=True)) if ids else set()

    # all_tenants: the records of a batch belong to many tenants; each keeps its own tenant_id.
    tenants, keys = live(Tenant.objects, "tenant_id"), live(ApiKey.all_tenants, "api_key_id")
    pools, backends = live(BackendPool.objects, "pool_id"), live(Backend.objects, "backend_id")
    kept = []
    for e in entries:
        if e.tenant_id not in tenants:
            log.error("ledger spool: tenant %s no longer exists, so this usage record cannot be written or billed; "
                      "dropped: %s", e.tenant_id, json.dumps(entry_to_record(e, timezone.now())))
            continue
        kept.append(dataclasses.replace(
            e, api_key_id=e.api_key_id if e.api_key_id in keys else None, pool_id=e.pool_id if e.pool_id in pools else None,
            backend_id=e.backend_id if e.backend_id in backends else None,
        ))
    return kept


def _write_replayed(records: list[dict]) -> None:
    """The spool replay's writer: the same idempotent insert as every batch."""
    entries = []
    for record in records:
        try:
            entries.append(entry_from_record(record))
        except ValueError as exc:
            log.warning("ledger spool: skipped a line that is not a usage record (%s): %.300r", exc, record)
    if entries:
        flush_batch(_with_live_references(entries))


def ledger_spool_replay(directory: Path) -> int:
    """Write what stopped gateway processes left in a spool directory (sync; `manage.py ledger_replay`).

    Returns the records replayed (rows already in the database are skipped). Files of running processes are
    left to them. Raises when the database refuses; the files stay.
    """
    spool = Spool(directory)
    try:
        return _replay_in_thread(spool)
    finally:
        spool.close()


def _replay_in_thread(spool: Spool) -> int:
    """Adopt the files of stopped processes, then replay everything this process holds (ledger thread)."""
    try:
        spool.adopt_orphans()
        return spool.replay(_write_replayed)
    except Exception:
        connection.close()
        raise


class Ledger:
    """Group-commit writer bound to one event loop (the gateway's), with a local spool for database outages.

    spool_dir None: no spool (a batch the database refuses is logged in full and counted as lost).
    """

    def __init__(self, *, spool_dir: Path | None = None, replay_interval_s: float = 10.0):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._timer: asyncio.Task | None = None
        self._replay_queued = False
        self._spool = Spool(spool_dir) if spool_dir is not None else None
        self.replay_interval_s = replay_interval_s
        self.batches = 0
        self.failures = 0  # records neither written nor spooled: lost to billing (logged in full)
        self.spooled = 0  # records in this process's spool files, waiting for the database

    def start(self) -> None:
        if self._task is None or self._task.done():
            loop = asyncio.get_running_loop()
            self._queue = asyncio.Queue()
            self._replay_queued = False
            self._task = loop.create_task(self._run(), name="ledger-writer")
            if self._spool is not None:
                self._queue_replay()  # first of all: what stopped processes left
                self._timer = loop.create_task(self._replay_timer(), name="ledger-replay-timer")

    async def stop(self) -> None:
        """Write what is queued, then stop. Spool files stay (their locks are released) for the next process."""
        if self._task is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._queue.put(None)
        try:
            await asyncio.wait_for(self._task, timeout=10)
        except asyncio.TimeoutError:
            log.error("ledger writer did not drain in 10 s; %d records may be lost", self._queue.qsize())
            self._task.cancel()
        self._task = None
        if self._spool is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._spool.close)
            self.spooled = 0
        # The writer thread outlives a stop (a restart reuses it) and keeps its database connection open between
        # batches: close it, or every stopped gateway holds one of the database's connections for good.
        await asyncio.get_running_loop().run_in_executor(self._executor, _close_connection)

    async def record(self, entry: LedgerEntry) -> bool:
        """Queue the entry and wait until it is in the database or the spool: True; False when the writer gave
        up (logged in full)."""
        self.start()
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((entry, fut))
        return await asyncio.shield(fut)

    async def existing(self, request_ids: list[str]) -> dict[str, tuple[int, int, datetime]]:
        """request id -> (input tokens, output tokens, created_at) of the records already in the database.

        Runs on the ledger's thread after what it was writing. Raises when the database refuses."""
        self.start()
        return await asyncio.get_running_loop().run_in_executor(self._executor, _existing_in_thread, list(request_ids))

    async def record_recovered(self, entries: list[LedgerEntry]) -> None:
        """Write records recovered from a dead process's journal, now (idempotent; a key, pool or backend deleted
        since becomes NULL, as in a spool replay). Raises when the database refuses: the journal is kept."""
        if entries:
            self.start()
            await asyncio.get_running_loop().run_in_executor(self._executor, _write_recovered_in_thread, list(entries))

    async def replay_spool(self) -> int:
        """Replay the spool now (adopting stopped processes' files): a crashed process's records first."""
        if self._spool is None:
            return 0
        count = await asyncio.get_running_loop().run_in_executor(self._executor, _replay_in_thread, self._spool)
        self.spooled = self._spool.records
        return count

    def submit(self, entry: LedgerEntry) -> None:
        """Queue without waiting (failed / cancelled requests; safe inside a cancelled task)."""
        self.start()
        self._queue.put_nowait((entry, None))

    def _queue_replay(self) -> None:
        if not self._replay_queued:
            self._replay_queued = True
            self._queue.put_nowait(_REPLAY)

    async def _replay_timer(self) -> None:
        while True:
            await asyncio.sleep(self.replay_interval_s)
            self._queue_replay()

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            item = await self._queue.get()
            batch = []
            replay = False
            while True:
                if item is None:
                    stopping = True
                elif item is _REPLAY:
                    replay = True
                else:
                    batch.append(item)
                if len(batch) >= MAX_BATCH or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if replay:
                self._replay_queued = False
                await self._replay()
            if batch:
                await self._write(batch)

    async def _write(self, batch: list) -> None:
        entries = [e for e, _ in batch]
        db_error = spool_error = None
        if self._spool is not None and self._spool.has_own_records:
            # The database is presumed down until the replay empties the spool: no retries on this batch's time.
            spool_error = await self._append_to_spool(entries, reason="earlier records are still spooled")
            if spool_error is not None:
                db_error = await self._insert(entries)
        else:
            db_error = await self._insert(entries)
            if db_error is not None:
                spool_error = await self._append_to_spool(entries, reason=str(db_error))
        self.batches += 1
        durable = db_error is None or spool_error is None
        if not durable:
            self.failures += len(entries)
            now = timezone.now()
            log.error("ledger: %d usage records NOT written (database: %s) and NOT spooled (%s): they are lost to billing "
                      "unless re-entered from this log. Records: %s", len(entries), db_error, spool_error,
                      " ".join(json.dumps(entry_to_record(e, now)) for e in entries))
        for _, fut in batch:
            if fut is not None and not fut.done():
                fut.set_result(durable)

    async def _insert(self, entries: list[LedgerEntry]) -> Exception | None:
        """Insert with retries; the last error, or None once written."""
        error = None
        for attempt in range(RETRIES):
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, _flush_in_thread, entries)
                return None
            except Exception as exc:  # retried safely: ignore_conflicts on request_id
                error = exc
                log.warning("ledger write failed (attempt %d/%d): %s", attempt + 1, RETRIES, exc)
                if attempt + 1 < RETRIES:
                    await asyncio.sleep(0.1 * (attempt + 1))
        return error

    async def _append_to_spool(self, entries: list[LedgerEntry], *, reason: str) -> Exception | str | None:
        """Append (fsynced) to this process's spool file; the error, or None once durable there."""
        if self._spool is None:
            return "no spool directory is configured (PLATFORM_LEDGER_SPOOL_DIR)"
        first = not self._spool.has_own_records
        now = timezone.now()
        records = [entry_to_record(e, now) for e in entries]
        try:
            path = await asyncio.get_running_loop().run_in_executor(self._executor, self._spool.append, records)
        except Exception as exc:
            return exc
        self.spooled = self._spool.records
        if first:
            log.warning("ledger: %d usage records could not be written to the database (%s); they are spooled to %s "
                        "and will be written when it is reachable again (tried every %.0f s). Until then new records "
                        "go to the spool too; gateway_ledger_spooled_records shows how many wait.",
                        len(entries), reason, path, self.replay_interval_s)
        return None

    async def _replay(self) -> None:
        spool = self._spool
        try:
            count = await asyncio.get_running_loop().run_in_executor(self._executor, _replay_in_thread, spool)
        except Exception as exc:
            self.spooled = spool.records
            if self.spooled:
                log.warning("ledger: %d spooled usage records still wait for the database (replay failed: %s); "
                            "next try in %.0f s.", self.spooled, exc, self.replay_interval_s)
            else:
                log.error("ledger: could not replay the spool in %s: %s", spool.directory, exc)
            return
        self.spooled = spool.records
        if count:
            log.info("ledger: replayed %d spooled usage records into the database (any already there were "
                     "skipped); the spool is empty again.", count)
