"""Recovering a stopped gateway process's journal (serving/journal.py): its requests in flight become ledger
records with status `interrupted` and the tokens it had delivered, their reservations are settled with the
same figures, and the scheduler slots they held are freed.

Order, so that a recovery interrupted at any point and run again counts nothing twice: the dead process's
ledger spool is replayed first (its finished records); then each request's settles, its admission's and its
budgets' (serving/budgets.py), both idempotent in Redis, with the figures of its ledger record if the dead
process wrote one, else the journal's; then the missing records
(request_id is unique, inserts ignore conflicts); only then is the journal removed. While the database
refuses, the journal stays and is tried again.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

from serving.admission import Reservation
from serving.budgets import recorded_recovered as budget_recorded_recovered
from serving.budgets import settle_recovered as budget_settle_recovered
from serving.journal import DeadJournal, OpenRequest
from serving.ledger import LedgerEntry

log = logging.getLogger(__name__)


def recovered_entry(req: OpenRequest) -> LedgerEntry:
    """The ledger record of a request whose process died: what the journal says it delivered."""
    r = req.record
    if req.input_tokens is not None:
        input_tokens = req.input_tokens
    else:  # as Call.counted_input_tokens: the estimate once a backend accepted the request, else nothing
        input_tokens = r["pe"] if req.accepted or req.output_tokens else 0
    return LedgerEntry(
        request_id=r["id"], tenant_id=r["t"], api_key_id=r.get("k"), endpoint=r["e"], model=r["m"], adapter=r.get("a") or "",
        pool_id=r.get("p"), backend_id=req.backend_id, input_tokens=input_tokens, output_tokens=req.output_tokens,
        status="interrupted", ttft_ms=req.ttft_ms, duration_ms=req.duration_ms,
        created_at=datetime.fromtimestamp(r["at"], timezone.utc),
    )


def recovered_reservation(req: OpenRequest) -> Reservation | None:
    r = req.record
    if not r.get("r"):
        return None
    tokens, window, tpm_cap, backend, life = r["r"]
    return Reservation(r["t"], r["id"], tokens, window, tpm_cap, backend, life)


async def journal_recover(dead: DeadJournal, *, ledger, admission, scheduler) -> int:
    """Recover one adopted journal (see the module docstring). Returns the requests recovered; raises (the
    journal stays, for another try) when the database refuses."""
    requests = dead.open_requests()
    if not requests:
        dead.remove()
        return 0
    await ledger.replay_spool()
    written = await ledger.existing([r.request_id for r in requests])
    missing: list[LedgerEntry] = []
    settles = []
    for req in requests:
        row = written.get(req.request_id)
        if row is not None:  # it finished its record before the process died
            (used_in, used_out), committed_ms = row[:2], int(row[2].timestamp() * 1000)
        else:
            entry = recovered_entry(req)
            missing.append(entry)
            (used_in, used_out), committed_ms = (entry.input_tokens, entry.output_tokens), 0
        used = used_in + used_out
        if req.record.get("b"):  # its money budgets and key limits (serving/budgets.py), with the same figures
            settles.append(budget_settle_recovered(req.record["b"], tenant_id=req.record["t"], request_id=req.request_id,
                                                   input_tokens=used_in, output_tokens=used_out, recorded=row is not None))
        reservation = recovered_reservation(req)
        if reservation is not None:
            settles.append(admission.settle_recovered(reservation, used_tokens=used, committed_ms=committed_ms))
        if req.slot_member and req.record.get("p") is not None:
            tenant, _, slot_id = req.slot_member.partition(":")
            settles.append(scheduler.state.free_slot(req.record["p"], slot_id, int(tenant)))
    await asyncio.gather(*settles)
    await ledger.record_recovered(missing)
    # Every record is in the database now: out of the budgets' pending set (serving/budgets.py).
    await asyncio.gather(*(budget_recorded_recovered(req.record["b"], tenant_id=req.record["t"], request_id=req.request_id)
                           for req in requests if req.record.get("b")))
    dead.remove()
    delivered = sum(e.output_tokens for e in missing)
    log.warning("journal %s: a gateway process stopped with %d requests in flight; %d recorded as interrupted "
                "(%d output tokens delivered), %d had their record already; their reservations are settled.",
                dead.path, len(requests), len(missing), delivered, len(requests) - len(missing))
    return len(requests)
