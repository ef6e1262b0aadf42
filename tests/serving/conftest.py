"""Fixtures for the serving tests: the tiny model (built once per session) and a LoRA adapter for it."""

from __future__ import annotations

import pytest

from serving.gateway import GatewayApp
from serving.gateway.settings import GatewaySettings
from tests.support.gateway import GatewayServer


@pytest.fixture(scope="session")
def lora_adapter_path(tiny_model_path, tmp_path_factory):
    """An untrained adapter with random non-zero lora_B, so it visibly changes the base model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    config = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5, generator=generator)
    path = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(path)
    return path


@pytest.fixture
def gateway_factory(transactional_db, dead_threads_connections_closed):
    """Start gateways (after the test has created its data); all are stopped at the end."""
    from serving.admission import reset_admission
    from serving.budgets import reset_budgets
    from serving.scheduler import reset_scheduler

    servers = []

    def start(**settings) -> GatewayServer:
        reset_admission()  # both hold asyncio state bound to the previous test's event loop
        reset_scheduler()
        reset_budgets()  # and the in-process budget counters of the previous test's tenants
        opts = dict(health_interval_s=0.2, health_timeout_s=1.0, config_poll_s=0.1, connect_timeout_s=1.0, read_timeout_s=30)
        opts.update(settings)
        server = GatewayServer(GatewayApp(settings=GatewaySettings(**opts))).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def sim_url():
    """A simulated dev backend (instant tokens) for one test."""
    from tests.support.gateway import sim_backend

    url, stop = sim_backend()
    yield url
    stop()
