"""The gateway's request journal: what a killed process had delivered is found, recorded once, and settled."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from serving import journal as journal_module
from serving.journal import Journal, adopt_dead
from serving.models import UsageRecord
from tests.support.gateway import make_base_model, make_key, make_pool, post, usage_records, wait_for

ROOT = Path(__file__).resolve().parents[2]

# A process that journals three requests, delivers tokens, finishes one of them, and is killed (SIGKILL).
KILLED_WRITER = textwrap.dedent("""
    import json, os, signal, sys, time
    from serving.journal import Journal

    class Call:  # what the gateway's Call offers the journal
        def __init__(self, out, inp=None, accepted=True, backend=7, ttft=12):
            self.output_tokens, self.input_tokens, self.backend_accepted = out, inp, accepted
            self.backend_id, self.ttft_ms, self.started_at = backend, ttft, time.perf_counter()

    spec = json.loads(sys.argv[2])
    j = Journal(sys.argv[1])
    entries = []
    for r in spec["requests"]:
        e = j.admit(dict(r["record"]))
        e.slot(r["slot"])
        for n in range(1, r["delivered"] + 1):
            e.progress(Call(n, r.get("input")))
        entries.append(e)
    for i in spec["finish"]:
        entries[i].part_done(); entries[i].part_done()
    print(j.path, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def killed_process_journal(directory: Path, requests: list[dict], finish: list[int] = ()) -> Path:
    """Run KILLED_WRITER in a process of its own; the journal folder it leaves."""
    out = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(directory), json.dumps({"requests": requests, "finish": list(finish)})],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == -9, out.stderr
    return Path(out.stdout.strip())


def record(rid: str, *, tenant=1, key=None, pool=None, estimate=9, reservation=None) -> dict:
    return {"id": rid, "t": tenant, "k": key, "e": "chat", "m": "tiny-chat", "a": "", "p": pool, "pe": estimate,
            "at": round(time.time(), 3), "r": reservation}


def test_a_killed_process_leaves_what_it_had_delivered_and_nothing_it_had_finished(tmp_path):
    path = killed_process_journal(tmp_path, [
        {"record": record("r-a"), "slot": "1:slotaaa", "delivered": 5},
        {"record": record("r-b"), "slot": "1:slotbbb", "delivered": 3, "input": 11},
        {"record": record("r-c"), "slot": "1:slotccc", "delivered": 8},
    ], finish=[2])
    mine = Journal(tmp_path)  # a live process's journal is never adopted
    try:
        [dead] = adopt_dead(tmp_path, own=mine.path)
        assert dead.path == path
        found = {r.request_id: r for r in dead.open_requests()}
        assert set(found) == {"r-a", "r-b"}
        assert (found["r-a"].output_tokens, found["r-a"].input_tokens, found["r-a"].accepted) == (5, None, True)
        assert (found["r-b"].output_tokens, found["r-b"].input_tokens, found["r-b"].backend_id) == (3, 11, 7)
        assert found["r-a"].slot_member == "1:slotaaa" and found["r-a"].ttft_ms == 12
        assert adopt_dead(tmp_path, own=mine.path) == []  # held by this adopter
        dead.remove()
        assert not path.exists()
    finally:
        mine.stop()
    assert list(tmp_path.iterdir()) == []  # a journal with nothing in flight leaves nothing behind


def test_rotated_logs_keep_the_requests_still_open(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "ROTATE_BYTES", 2000)
    j = Journal(tmp_path)

    class Call:
        output_tokens, input_tokens, backend_accepted, backend_id, ttft_ms = 4, None, True, 1, 3
        started_at = time.perf_counter()

    keep = []
    for i in range(200):
        e = j.admit(record(f"r{i}"))
        e.progress(Call())
        if i % 50 == 0:
            keep.append(f"r{i}")
        else:
            e.part_done()
            e.part_done()
    assert len(list(j.path.glob("log.*"))) == 1 and j.in_flight == 4
    path = j.path
    j.stop()  # stopped with requests in flight: the folder stays for a recovery
    [dead] = adopt_dead(tmp_path)
    assert dead.path == path
    assert sorted(r.request_id for r in dead.open_requests()) == sorted(keep)
    dead.remove()


def test_more_requests_in_flight_than_the_table_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "INITIAL_SLOTS", 4)
    j = Journal(tmp_path)
    entries = [j.admit(record(f"r{i}")) for i in range(10)]
    for e in entries[:3]:
        e.part_done()
        e.part_done()
    path = j.path
    j.stop()
    [dead] = adopt_dead(tmp_path)
    assert dead.path == path and sorted(r.request_id for r in dead.open_requests()) == sorted(f"r{i}" for i in range(3, 10))
    dead.remove()


# ---- the gateway recovers them ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_gateway_records_a_dead_processes_requests_once_and_settles_them(world, gateway_factory, sim_url, tmp_path):
    pool = make_pool("shared", make_base_model(), [sim_url])
    key, secret = make_key(world.tenant)
    t = world.tenant.id
    reservation = [200, time.strftime("%Y%m", time.gmtime()), 0, "local", ""]
    already = record("r-finished", tenant=t, key=key.id, pool=pool.id, reservation=reservation)
    killed_process_journal(tmp_path / "journal", [
        {"record": record("r-cut", tenant=t, key=key.id, pool=pool.id, reservation=reservation), "slot": f"{t}:s1", "delivered": 17},
        {"record": record("r-queued", tenant=t, key=key.id, pool=pool.id, reservation=reservation), "slot": "", "delivered": 0},
        {"record": already, "slot": f"{t}:s2", "delivered": 30},
    ])
    # The dead process had written its last request's record (the final figures) before it died.
    UsageRecord.objects.for_tenant(world.tenant).create(request_id="r-finished", api_key=key, endpoint="chat", model="tiny-chat",
                                                        pool=pool, input_tokens=12, output_tokens=31, status="ok")
    gw = gateway_factory(journal_dir=tmp_path / "journal")
    rows = {r.request_id: r for r in wait_for(lambda: len(usage_records(world.tenant)) == 3 and usage_records(world.tenant))}
    assert (rows["r-cut"].status, rows["r-cut"].output_tokens, rows["r-cut"].input_tokens) == ("interrupted", 17, 9)
    assert (rows["r-queued"].output_tokens, rows["r-queued"].input_tokens) == (0, 0)  # no backend had it: nothing billed
    assert (rows["r-finished"].status, rows["r-finished"].output_tokens) == ("ok", 31)  # its own record stands
    assert wait_for(lambda: list((tmp_path / "journal").iterdir()) == [gw.app.journal.path])  # the dead one is gone
    # The gateway's own requests pass through its journal and leave it.
    r = post(f"{gw.url}/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4},
             {"authorization": f"Bearer {secret}"})
    assert r.status_code == 200
    assert wait_for(lambda: gw.app.journal.in_flight == 0)
    # A second process finds nothing more to recover.
    gw2 = gateway_factory(journal_dir=tmp_path / "journal")
    time.sleep(0.5)
    assert len(usage_records(world.tenant)) == 4 and gw2.app.journal.in_flight == 0
