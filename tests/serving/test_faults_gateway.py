"""The gateway under an unexpected failure: the client gets OpenAI's error shape, never a plain-text 500."""

from __future__ import annotations

import pytest

from serving.scheduler import FairScheduler
from tests.support.gateway import make_base_model, make_key, make_pool, post, stream_lines


@pytest.fixture
def broken_scheduler(monkeypatch):
    async def acquire(self, **kwargs):
        raise RuntimeError("simulated bug in the scheduler")

    monkeypatch.setattr(FairScheduler, "acquire", acquire)
    # With Redis the pool's fast-path slot is taken in admission's script (FairScheduler.offer): offer none, so acquire runs.
    monkeypatch.setattr(FairScheduler, "offer", lambda self, **kwargs: None)


@pytest.mark.parametrize("stream", [False, True])
def test_an_unexpected_failure_is_a_json_error_in_openai_shape(world, gateway_factory, sim_url, broken_scheduler, stream):
    make_pool("shared", make_base_model(), [sim_url])
    _, key = make_key(world.tenant)
    gw = gateway_factory()
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": stream}
    r = post(f"{gw.url}/v1/chat/completions", body, {"authorization": f"Bearer {key}"})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error" and "Retry" in error["message"]


def test_an_unexpected_failure_on_tgi_routes_is_a_tgi_error(world, gateway_factory, sim_url, broken_scheduler):
    make_pool("shared", make_base_model(), [sim_url])
    _, key = make_key(world.tenant)
    gw = gateway_factory()
    status, lines = stream_lines(f"{gw.url}/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 2}},
                                 {"authorization": f"Bearer {key}"})
    assert status == 500 and '"error_type": "internal_error"' in lines[0]
