"""The gateway's collector setting (serving.gateway.app.tune_gc): once a gateway has started, the youngest generation
is collected every GC_YOUNG_THRESHOLD allocations; the older generations' thresholds are kept."""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace

import pytest

from serving.gateway import app as gateway_app


class _Store:
    def start(self) -> None:
        pass


class _Health:
    async def check_all(self, session) -> None:
        pass

    def start(self, session) -> None:
        pass


class _Ledger:
    def start(self) -> None:
        pass


@pytest.fixture
def gc_threshold():
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_a_started_gateway_collects_the_youngest_generation_less_often(gc_threshold, monkeypatch):
    gc.set_threshold(700, 11, 12)
    gw = gateway_app.GatewayApp.__new__(gateway_app.GatewayApp)  # only what startup touches, without config or backends
    gw.store, gw.health, gw.ledger = _Store(), _Health(), _Ledger()
    gw.settings = SimpleNamespace(connect_timeout_s=1, read_timeout_s=1, journal_dir=None)
    monkeypatch.setattr(gateway_app.aiohttp, "ClientSession", lambda **kw: None)
    monkeypatch.setattr(gateway_app.aiohttp, "TCPConnector", lambda **kw: None)
    asyncio.run(gw.startup())
    assert gateway_app.GC_YOUNG_THRESHOLD > 700
    assert gc.get_threshold() == (gateway_app.GC_YOUNG_THRESHOLD, 11, 12)
