"""The ledger's local spool: a database outage loses no usage, and replay writes every record exactly once."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import OperationalError
from django.utils import timezone

from serving import ledger, ledger_spool
from serving.ledger import Ledger, LedgerEntry, entry_from_record, entry_to_record, ledger_spool_replay
from serving.ledger_spool import Spool, spool_summary
from serving.models import UsageRecord
from tests.support.users import PASSWORD
from tests.support.gateway import make_base_model, make_key, make_pool, post, stream_lines, wait_for

ROOT = Path(__file__).resolve().parents[2]


class Outage:
    """A switch for the database as the ledger sees it (every insert goes through ledger.flush_batch)."""

    def __init__(self):
        self.down = False
        self.attempts = 0


@pytest.fixture
def outage(monkeypatch) -> Outage:
    state = Outage()
    real = ledger.flush_batch

    def flush_batch(entries):
        state.attempts += 1
        if state.down:
            raise OperationalError("connection to server at 10.0.0.5 failed: Connection refused (simulated outage)")
        return real(entries)

    monkeypatch.setattr(ledger, "flush_batch", flush_batch)
    return state


def _entry(tenant_id: int, request_id: str, **fields) -> LedgerEntry:
    values = dict(request_id=request_id, tenant_id=tenant_id, api_key_id=None, endpoint="chat", model="tiny-chat", adapter="",
                  pool_id=None, backend_id=None, input_tokens=11, output_tokens=7, status="ok", ttft_ms=3, duration_ms=20)
    return LedgerEntry(**{**values, **fields})


def _records(tenant, *request_ids: str, **fields) -> list[dict]:
    now = timezone.now()
    return [entry_to_record(_entry(tenant.id, rid, **fields), now) for rid in request_ids]


def _rows(tenant) -> dict[str, UsageRecord]:
    return {r.request_id: r for r in UsageRecord.objects.for_tenant(tenant)}


def _spooled(directory: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(directory.glob("ledger-*.jsonl")) for line in path.read_text().splitlines()]


def _metric(gw_url: str, name: str) -> float:
    import requests

    for line in requests.get(f"{gw_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


# ---- through the gateway ---------------------------------------------------------------------------


def test_database_outage_spools_records_before_the_answer_ends_and_replay_writes_each_once(world, gateway_factory, sim_url, tmp_path, outage):
    make_pool("shared", make_base_model(), [sim_url])
    _, key = make_key(world.tenant)
    spool_dir = tmp_path / "spool"
    gw = gateway_factory(ledger_spool_dir=spool_dir, ledger_replay_interval_s=0.2)
    auth = {"authorization": f"Bearer {key}"}
    outage.down = True

    usage = {}
    for n in (1, 2):
        r = post(f"{gw.url}/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                 {**auth, "x-request-id": f"plain-{n}"})
        assert r.status_code == 200, r.text
        usage[f"plain-{n}"] = (r.json()["usage"]["prompt_tokens"], r.json()["usage"]["completion_tokens"])
        # Durable in the spool by the time the answer has ended (no waiting here).
        assert {rec["request_id"].split("~")[0] for rec in _spooled(spool_dir)} >= {f"plain-{n}"}
    status, lines = stream_lines(f"{gw.url}/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}, {**auth, "x-request-id": "streamed"})
    assert status == 200 and lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2][len("data: "):])["usage"]
    usage["streamed"] = (final["prompt_tokens"], final["completion_tokens"])

    spooled = {rec["request_id"].split("~")[0]: (rec["input_tokens"], rec["output_tokens"]) for rec in _spooled(spool_dir)}
    assert spooled == usage and all(out > 0 for _, out in usage.values())
    assert _rows(world.tenant) == {}
    assert _metric(gw.url, "gateway_ledger_spooled_records") == 3
    assert _metric(gw.url, "gateway_ledger_unwritten_records") == 0

    outage.down = False
    assert wait_for(lambda: len(_rows(world.tenant)) == 3 and not list(spool_dir.glob("ledger-*.jsonl")))
    rows = {rid.split("~")[0]: (r.input_tokens, r.output_tokens, r.status) for rid, r in _rows(world.tenant).items()}
    assert rows == {rid: (i, o, "ok") for rid, (i, o) in usage.items()}
    assert wait_for(lambda: _metric(gw.url, "gateway_ledger_spooled_records") == 0)

    # Back to normal: the next request goes to the database directly.
    r = post(f"{gw.url}/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 2}, auth)
    assert r.status_code == 200 and len(_rows(world.tenant)) == 4 and not list(spool_dir.glob("ledger-*.jsonl"))


# ---- the writer ------------------------------------------------------------------------------------


def test_while_records_wait_in_the_spool_new_batches_skip_the_database(world, transactional_db, tmp_path, outage):
    async def scenario():
        writer = Ledger(spool_dir=tmp_path, replay_interval_s=3600)
        outage.down = True
        await writer.record(_entry(world.tenant.id, "first"))
        assert outage.attempts == ledger.RETRIES and writer.spooled == 1
        await writer.record(_entry(world.tenant.id, "second"))  # the database is presumed down: no retries
        assert outage.attempts == ledger.RETRIES and writer.spooled == 2 and writer.failures == 0
        await writer.stop()  # the file stays, unlocked, for the next process

    asyncio.run(scenario())
    assert [r["request_id"] for r in _spooled(tmp_path)] == ["first", "second"]
    outage.down = False
    assert ledger_spool_replay(tmp_path) == 2
    assert sorted(_rows(world.tenant)) == ["first", "second"] and _spooled(tmp_path) == []


def test_a_writer_replays_at_start_up_what_a_stopped_process_left(world, transactional_db, tmp_path):
    left = Spool(tmp_path)
    left.append(_records(world.tenant, "left-1", "left-2"))
    left.close()  # that process stopped

    async def scenario():
        writer = Ledger(spool_dir=tmp_path, replay_interval_s=3600)
        writer.start()
        await writer.record(_entry(world.tenant.id, "new"))  # queued behind the start-up replay
        await writer.stop()

    asyncio.run(scenario())
    assert sorted(_rows(world.tenant)) == ["left-1", "left-2", "new"] and _spooled(tmp_path) == []


# ---- replay ----------------------------------------------------------------------------------------


def test_replay_after_a_crash_between_insert_and_removal_counts_nothing_twice(world, tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    spool.append(_records(world.tenant, "a", "b", input_tokens=100, output_tokens=50))

    def killed(_held):
        raise RuntimeError("process killed before the spool file was removed")

    monkeypatch.setattr(spool, "_remove", killed)
    with pytest.raises(RuntimeError):
        spool.replay(ledger._write_replayed)
    spool.close()
    assert sorted(_rows(world.tenant)) == ["a", "b"] and len(_spooled(tmp_path)) == 2  # inserted, file still there

    assert ledger_spool_replay(tmp_path) == 2  # replayed again after the restart
    assert ledger_spool_replay(tmp_path) == 0  # and a second time: nothing left
    rows = UsageRecord.objects.for_tenant(world.tenant)
    assert rows.count() == 2 and sum(r.input_tokens + r.output_tokens for r in rows) == 300
    assert _spooled(tmp_path) == []


def test_a_torn_last_line_is_skipped_with_a_warning_and_the_rest_replayed(world, tmp_path, caplog):
    spool = Spool(tmp_path)
    spool.append(_records(world.tenant, "whole-1", "whole-2"))
    path = spool.own_path
    spool.close()
    with open(path, "ab") as fh:  # killed in the middle of the next append
        fh.write(json.dumps(_records(world.tenant, "torn")[0]).encode()[:40])

    with caplog.at_level(logging.WARNING, logger="serving.ledger_spool"):
        assert ledger_spool_replay(tmp_path) == 2
    assert sorted(_rows(world.tenant)) == ["whole-1", "whole-2"]
    assert "torn line" in caplog.text and str(path) in caplog.text
    assert not path.exists()


def test_a_failed_append_is_cut_away_so_the_next_append_stays_readable(world, tmp_path, monkeypatch, caplog):
    spool = Spool(tmp_path)
    spool.append(_records(world.tenant, "before"))
    real_write_all = ledger_spool._write_all

    def disk_full(fd, data):
        real_write_all(fd, data[:25])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ledger_spool, "_write_all", disk_full)
    with pytest.raises(OSError):
        spool.append(_records(world.tenant, "failed"))
    monkeypatch.undo()
    spool.append(_records(world.tenant, "after"))
    assert spool.records == 2
    with caplog.at_level(logging.WARNING, logger="serving.ledger_spool"):
        assert spool.replay(ledger._write_replayed) == 2
    assert sorted(_rows(world.tenant)) == ["after", "before"] and "skipped" not in caplog.text


def test_each_process_appends_to_its_own_file_and_a_killed_process_file_is_adopted(world, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, json, time\nfrom serving.ledger_spool import Spool\n"
         "spool = Spool(sys.argv[1]); spool.append([json.loads(sys.argv[2])]); print(spool.own_path, flush=True); time.sleep(120)",
         str(tmp_path), json.dumps(_records(world.tenant, "theirs")[0])],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        theirs = Path(holder.stdout.readline().strip())
        ours = Spool(tmp_path)
        ours.append(_records(world.tenant, "ours"))
        assert ours.own_path != theirs and theirs.exists()
        assert ours.adopt_orphans() == 0  # the other process is alive: its file is its own
        assert ours.records == 1
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert ours.adopt_orphans() == 1 and ours.records == 2
    assert ours.replay(ledger._write_replayed) == 2
    assert sorted(_rows(world.tenant)) == ["ours", "theirs"] and _spooled(tmp_path) == []
    ours.close()


def test_replay_clears_references_deleted_meanwhile_and_drops_records_of_a_missing_tenant(world, tmp_path, caplog):
    pool = make_pool("shared", make_base_model(), ["http://127.0.0.1:1"])
    backend = pool.backends.get()
    spool = Spool(tmp_path)
    spool.append(_records(world.tenant, "kept", pool_id=pool.id, backend_id=backend.id + 1000, api_key_id=999_999))
    spool.append([{**_records(world.tenant, "orphaned")[0], "tenant_id": 999_999}])
    spool.close()

    with caplog.at_level(logging.ERROR, logger="serving.ledger"):
        assert ledger_spool_replay(tmp_path) == 2
    row = _rows(world.tenant)["kept"]
    assert (row.pool_id, row.backend_id, row.api_key_id, row.input_tokens, row.output_tokens) == (pool.id, None, None, 11, 7)
    assert UsageRecord.all_tenants.filter(request_id="orphaned").count() == 0
    assert "tenant 999999 no longer exists" in caplog.text and '"request_id": "orphaned"' in caplog.text
    assert _spooled(tmp_path) == []


def test_a_spool_line_round_trips_to_the_same_entry_and_bad_lines_are_refused(world):
    entry = _entry(world.tenant.id, "r", api_key_id=5, pool_id=None, ttft_ms=None, created_at=timezone.now())
    assert entry_from_record(json.loads(json.dumps(entry_to_record(entry, timezone.now())))) == entry
    good = entry_to_record(entry, timezone.now())
    for bad in ({**good, "input_tokens": "11"}, {**good, "output_tokens": True}, {k: v for k, v in good.items() if k != "status"},
                {**good, "created_at": "2026-01-15T10:00:00"}):
        with pytest.raises(ValueError):
            entry_from_record(bad)


# ---- what staff see --------------------------------------------------------------------------------


def test_staff_pools_page_shows_records_waiting_in_the_spool(client, world, settings, tmp_path):
    from django.contrib.auth import get_user_model

    settings.PLATFORM_LEDGER_SPOOL_DIR = tmp_path
    staff = get_user_model().objects.create_user("staff@platform.test", "staff@platform.test", PASSWORD, is_staff=True)
    assert client.login(username=staff.username, password=PASSWORD)
    assert "not yet in the ledger" not in client.get("/staff/pools/").content.decode()

    spool = Spool(tmp_path)
    spool.append(_records(world.tenant, "w1", "w2", "w3"))
    assert spool_summary(tmp_path).records == 3
    html = client.get("/staff/pools/").content.decode()
    assert "3 usage records not yet in the ledger" in html and str(tmp_path) in html
    spool.close()
