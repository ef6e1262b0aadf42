"""One admitted request's usage: settled in admission once and recorded in the ledger once, whatever ends it.

Its `Accounting` is the only code that settles a reservation or writes a ledger record. Every exit path goes
through it — the answer (`complete`), a backend that refuses or fails before its first token (`refund`), a stream
cut mid-answer (`interrupt`), the client hanging up (`cancel`), an unexpected failure — and ends with `close()`:
- `settle_once()` counts the real tokens (input + output delivered) against the tenant's limits and frees the rest
  of the reservation, once; every caller awaits the same settle (one future, shielded from its callers' cancellation);
- `record_once()` writes the ledger record, once, after the settle (docs/limits.md, "Faults": a counter Redis lost
  is re-seeded from the ledger leaving out the requests Redis still tracks, so a record must not precede its settle);
  a completed request awaits it before its last byte, the others leave it to a task of its own;
- it is the request's place in the process's journal (serving/journal.py) from admission until both happened: the
  delivered tokens are stored there before each chunk goes out, so a crash of the process bills what was sent.
"""

from __future__ import annotations

import asyncio
import logging
import time

from serving.budgets import journal_fields
from serving.gateway import budget_gate
from serving.ledger import LedgerEntry

log = logging.getLogger(__name__)


class Accounting:
    """Who the request is (tenant, key, endpoint, model, pool), what it has used so far, and its settle and record."""

    __slots__ = ("request_id", "endpoint", "tenant", "key_id", "model", "adapter", "pool", "started_at", "prompt_estimate",
                 "reservation", "journal", "backend_id", "input_tokens", "output_tokens", "ttft_ms", "backend_accepted",
                 "status", "completed", "recorded", "pending_slot", "slot", "_scheduler", "_admission", "_ledger", "_background",
                 "_settling", "budget")

    def __init__(self, *, request_id: str, endpoint, tenant, key_id: int | None, model: str, adapter: str, pool, started_at: float,
                 prompt_estimate: int, reservation, admission, ledger, background: set, budget=None):
        self.request_id = request_id
        self.endpoint = endpoint  # serving.gateway.endpoints.Endpoint
        self.tenant = tenant
        self.key_id = key_id
        self.model = model
        self.adapter = adapter
        self.pool = pool
        self.started_at = started_at  # time.perf_counter() when the request arrived
        self.prompt_estimate = prompt_estimate  # the gateway's count of the prompt (exact, or a bound)
        self.reservation = reservation  # admission's, settled once with the tokens the ledger records
        self.journal = None  # its place in the process's journal, or None
        self.backend_id: int | None = None
        self.input_tokens: int | None = None  # the backend's count, once it finished
        self.output_tokens = 0  # delivered to the client so far (the backend's count once it finished)
        self.ttft_ms: int | None = None
        self.backend_accepted = False  # a backend started answering: its prompt is counted
        self.status = "error"  # the ledger's: ok | error | cancelled | interrupted
        self.completed = False  # the answer is complete and its last byte on its way: a disconnect is no cancellation
        self.recorded = False
        self.pending_slot = None  # a scheduler slot taken with the admission, until the request's schedule stage takes it
        self.slot = None  # the scheduler slot it holds (released with the settle when admission can: one round trip)
        self._scheduler = None
        self._admission = admission
        self._ledger = ledger
        self._background = background  # the gateway's tasks kept alive until done (awaited at shutdown)
        self._settling: asyncio.Future | None = None
        self.budget = budget  # its money budgets' and key limits' reservation (serving/gateway/budget_gate.py), or None

    # ---- the journal ------------------------------------------------------------------------------------

    def open_journal(self, journal) -> None:
        """Journal the request (one write): from now on a crash of the process loses none of its usage."""
        try:
            self.journal = journal.admit(self.journal_line())
        except OSError:  # (disk full): served and recorded all the same, only not safe from a crash of this process
            log.exception("request %s: could not be journaled in %s", self.request_id, journal.path)

    def journal_line(self) -> dict:
        """The request's journal line: what a recovery needs for its ledger record and its settle."""
        r = self.reservation
        return {
            "id": self.request_id, "t": self.tenant.id, "k": self.key_id, "e": self.endpoint.name, "m": self.model, "a": self.adapter,
            "p": self.pool.id, "pe": self.prompt_estimate, "at": round(time.time(), 3),
            "r": [r.tokens, r.window, r.tpm_cap, r.backend, r.life] if r is not None else None,
            "b": journal_fields(self.budget.reservation, self.budget.price) if self.budget is not None else None,
        }

    def hold_slot(self, slot, scheduler=None) -> None:
        """The scheduler slot it holds, in the journal, so that a recovery frees it at once. With `scheduler`, the slot is
        released with the settle (its Redis half in the settle's round trip) if it still runs then."""
        self.slot, self._scheduler = slot, scheduler
        if self.journal is not None:
            self.journal.slot(f"{slot.tenant_id}:{slot.slot_id}")

    def _part_done(self) -> None:
        """Its ledger record is durable, or its settle happened: after both it leaves the journal."""
        if self.journal is not None:
            self.journal.part_done()

    # ---- what it used -----------------------------------------------------------------------------------

    def first_token(self) -> None:
        """The backend's first token (or tool-call fragment): its time, and the backend accepted the request."""
        if self.ttft_ms is None:
            self.ttft_ms = int((time.perf_counter() - self.started_at) * 1000)
            self.backend_accepted = True

    def deliver(self, total: int) -> None:
        """`total` tokens delivered so far: counted (and journaled) before the chunk goes out, so a crash after the
        send bills it. One store into the journal's shared memory, no system call."""
        self.output_tokens = total
        if self.journal is not None:
            self.journal.progress(self)

    @property
    def counted_input_tokens(self) -> int:
        """Input tokens for the ledger and the limits: the backend's count, else the estimate once a backend
        accepted the request, else none."""
        if self.input_tokens is not None:
            return self.input_tokens
        return self.prompt_estimate if self.backend_accepted else 0

    # ---- how it ended -----------------------------------------------------------------------------------

    async def complete(self, finish, delivered: int) -> None:
        """The backend finished: its counts, then settled and durable in the ledger, before the client sees the end."""
        self.backend_accepted = True
        self.status = "ok"
        self.input_tokens = finish.prompt_tokens if finish.prompt_tokens is not None else self.prompt_estimate
        self.deliver(finish.completion_tokens if finish.completion_tokens is not None else delivered)
        self.completed = True
        write = self.record_once()
        if write is not None:
            await write

    def refund(self) -> None:
        """The backend refused or failed before its first token: nothing is charged (OpenAI bills no 4xx/5xx); the
        record keeps the request with 0 tokens, and the scheduler takes its charge back."""
        self.backend_accepted = False

    def interrupt(self) -> None:
        """The stream broke after its first byte: recorded as `interrupted` with what was delivered."""
        self.status = "interrupted"
        self.record_once()

    def cancel(self) -> None:
        """The client hung up before the end: recorded as `cancelled` with what was delivered."""
        self.status = "cancelled"

    # ---- settle and record, exactly once ----------------------------------------------------------------

    async def settle_once(self) -> None:
        """Count the request's real tokens against its limits and refund the rest of its reservation, once (the same
        figures as its ledger record). Every caller waits for the same settle."""
        if self._settling is None:
            self._settling = asyncio.ensure_future(self._settle())
        await asyncio.shield(self._settling)

    async def _settle(self) -> None:
        if self.journal is not None:
            self.journal.progress(self)  # the final figures, in case the process dies before its record is written
        if self.budget is not None:  # the same figures as the ledger record: its tokens and their exact cost
            try:
                await budget_gate.settle(self.budget, input_tokens=self.counted_input_tokens, output_tokens=self.output_tokens,
                                         status=self.status)
            except Exception:
                log.exception("request %s: settling its budgets failed; the reservation is released when it expires", self.request_id)
        reservation = self.reservation
        if reservation is None:
            self._part_done()
            return
        reservation.on_settled = self._part_done  # now, or once Redis takes it (retried off the request path)
        slot_free = None
        if self.slot is not None and self._scheduler is not None and getattr(self._admission, "settles_slots", False):
            # The backend is done (a settle comes at the answer's end): its slot goes now, in the settle's round trip.
            slot_free = self._scheduler.detach(self.slot, input_tokens=self.input_tokens or self.prompt_estimate,
                                               output_tokens=self.output_tokens, refund=not self.backend_accepted)
        try:
            kwargs = {"slot_free": slot_free} if slot_free is not None else {}
            await self._admission.settle(reservation, used_tokens=self.counted_input_tokens + self.output_tokens, **kwargs)
        except Exception:  # a bug, not an outage (those are retried): the ledger record must still be written
            log.exception("request %s: settling failed; its reservation is released when its lease runs out", self.request_id)

    def record_once(self) -> asyncio.Task | None:
        """The request's ledger record with what it used now, written after its settle, once: the write (a task of its
        own, safe inside a cancelled request) the first time, None after. Await it for a durable record."""
        if self.recorded:
            return None
        self.recorded = True
        task = asyncio.ensure_future(self._write(self.entry()))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def entry(self) -> LedgerEntry:
        input_tokens = self.input_tokens = self.counted_input_tokens
        return LedgerEntry(
            request_id=self.request_id, tenant_id=self.tenant.id, api_key_id=self.key_id, endpoint=self.endpoint.name,
            model=self.model, adapter=self.adapter, pool_id=self.pool.id, backend_id=self.backend_id,
            input_tokens=input_tokens, output_tokens=self.output_tokens, status=self.status, ttft_ms=self.ttft_ms,
            duration_ms=int((time.perf_counter() - self.started_at) * 1000),
        )

    async def _write(self, entry: LedgerEntry) -> None:
        await self.settle_once()
        if await self._ledger.record(entry):
            if self.reservation is not None:
                self.reservation.committed_ms = int(time.time() * 1000)  # for a settle still waiting for Redis
            if self.budget is not None and not getattr(self._ledger, "spooled", 0):  # in the database, not the spool
                budget_gate.recorded(self.budget)  # out of the budgets' pending set (batched, not awaited)
            self._part_done()

    async def close(self) -> None:
        """The request's end (its last line): settled now if nothing settled it (the client left, or nothing was sent);
        a request that never ran (a queue timeout, cancelled while queued) has no ledger record to wait for."""
        await self.settle_once()
        if not self.recorded:
            self._part_done()
