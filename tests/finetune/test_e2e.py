"""End to end with the official OpenAI SDK: upload → job → worker → deploy to a dev backend → the adapter answers."""

from __future__ import annotations

import json

import pytest
from openai import NotFoundError, OpenAI
from rest_framework.test import APIClient

from finetune.tasks import run_finetune_job
from serving.models import Backend, BackendPool, BaseModel
from tenants import services
from tenants.services import Actor
from tests.support.finetune import zebra_dataset

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "system", "content": "You are the approvals bot."},
            {"role": "user", "content": "Is request 9876 approved?"}]  # not in the training file


@pytest.fixture
def dev_backend(tiny_model_path):
    from devbackend.config import BackendConfig
    from devbackend.runner import run_in_thread

    url, stop = run_in_thread(BackendConfig(model=str(tiny_model_path), port=0, flavor="dev"))
    yield url
    stop()


def test_sdk_upload_train_deploy_and_answer(transactional_db, live_server, world, tiny_model_path, dev_backend,
                                            tmp_path, settings, _no_broker):
    settings.STORAGE_DIR = tmp_path / "storage"
    base = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat", local_path=str(tiny_model_path),
                                    context_length=1024)
    pool = BackendPool.objects.create(name="shared-tiny", base_model=base, kind="dev")
    backend = Backend.objects.create(pool=pool, url=dev_backend)
    _, secret = services.api_key_create(tenant=world.tenant, name="sdk", scopes=["finetune", "inference"],
                                        actor=Actor(user=world.owner))
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key=secret, max_retries=0)

    dataset = tmp_path / "zebra.jsonl"
    dataset.write_bytes(zebra_dataset(50))
    uploaded = client.files.create(file=open(dataset, "rb"), purpose="fine-tune")
    assert uploaded.status == "uploaded" and uploaded.bytes == dataset.stat().st_size  # stored; a worker validates it
    assert client.files.wait_for_processing(uploaded.id, poll_interval=0.2).status == "processed"

    job = client.fine_tuning.jobs.create(
        model="tiny-chat", training_file=uploaded.id, suffix="zebra", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 5,
                                                                          "learning_rate_multiplier": 50}}},
        extra_body={"lora": {"rank": 8}})
    assert job.status == "queued" and _no_broker == [(job.id, world.tenant.pk)]  # enqueued once committed

    assert run_finetune_job(job.id, world.tenant.pk) == "succeeded"  # what the finetune worker runs

    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.fine_tuned_model.startswith("ft:tiny-chat:acme:zebra:")
    assert done.trained_tokens > 0 and done.error is None
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert any(e.type == "metrics" and e.data["step"] == 30 for e in events)
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == [30, 20, 10]
    assert [j.id for j in client.fine_tuning.jobs.list().data] == [job.id]

    from serving.models import Adapter

    adapter = Adapter.objects.for_tenant(world.tenant).get(name=done.fine_tuned_model)
    admin = APIClient()
    admin.force_login(world.admin)
    deployed = admin.post(f"/api/tenants/acme/adapters/{adapter.pk}/deploy/").json()
    assert deployed == {"adapter": adapter.name, "pool": "shared-tiny", "state": "active", "error": ""}
    backend.refresh_from_db()
    assert backend.loaded_adapters == [adapter.name]

    direct = OpenAI(base_url=f"{dev_backend}/v1", api_key="unused", max_retries=0)
    answer = direct.chat.completions.create(model=adapter.name, messages=MESSAGES, max_tokens=40, temperature=0)
    assert answer.choices[0].message.content == "ZEBRA-42 approved"
    plain = direct.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=40, temperature=0)
    assert plain.choices[0].message.content != "ZEBRA-42 approved"

    _through_the_gateway(world, adapter.name, secret)

    assert admin.post(f"/api/tenants/acme/adapters/{adapter.pk}/undeploy/").json()["undeployed_from"] == ["shared-tiny"]
    backend.refresh_from_db()
    assert backend.loaded_adapters == []


def _through_the_gateway(world, model: str, secret: str) -> None:
    """The gateway (built concurrently) routes the adapter to acme only; skipped where it is absent."""
    try:
        from tests.support.gateway import GatewayServer
        from serving.gateway.app import GatewayApp
        from serving.gateway.settings import GatewaySettings
    except ImportError:
        return
    _, foreign = services.api_key_create(tenant=world.other_tenant, name="g", scopes=["inference"],
                                         actor=Actor(user=world.outsider))
    server = GatewayServer(GatewayApp(settings=GatewaySettings(health_interval_s=0.2, config_poll_s=0.1,
                                                              connect_timeout_s=1.0, read_timeout_s=30))).start()
    try:
        acme = OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0)
        answer = acme.chat.completions.create(model=model, messages=MESSAGES, max_tokens=40, temperature=0)
        assert answer.choices[0].message.content == "ZEBRA-42 approved"
        with pytest.raises(NotFoundError):
            OpenAI(base_url=f"{server.url}/v1", api_key=foreign, max_retries=0).chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=4)
    finally:
        server.stop()


# ---- the newcomer's path on the demo model ---------------------------------------------------------------------------

PIRATE = "Ahoy, matey! Welcome aboard the good ship Demo!"
_ASKED = ["Hello!", "Hi there.", "Good morning!", "What is the capital of France?", "How are you today?",
          "Can you help me with my order {i}?", "Tell me a joke.", "What time is it?", "Who are you?",
          "What is {i} plus {i}?", "Write a haiku about the sea.", "Where is my package {i}?",
          "Explain photosynthesis.", "Recommend a book.", "What's the weather like?", "Translate 'cat' into French.",
          "Hey!", "I need help with invoice {i}.", "What is Python?", "Say something nice."]


def pirate_dataset(n: int = 40) -> bytes:
    """What a newcomer writes first: a few dozen varied questions, every answer the same pirate greeting."""
    rows = [{"messages": [{"role": "user", "content": _ASKED[i % len(_ASKED)].format(i=100 + 7 * i)},
                          {"role": "assistant", "content": PIRATE}]} for i in range(n)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


@pytest.fixture
def demo_backend(demo_model_path):
    from devbackend.config import BackendConfig
    from devbackend.runner import run_in_thread

    url, stop = run_in_thread(BackendConfig(model=str(demo_model_path), port=0, flavor="dev", max_total_tokens=2048))
    yield url
    stop()


def test_a_newcomers_sdk_fine_tune_with_every_default_answers_as_taught_when_the_job_succeeds(
        transactional_db, live_server, world, demo_model_path, demo_backend, tmp_path, settings, _no_broker):
    """OpenAI fine-tuning code, unmodified: upload, create with defaults, wait, call the model. No deploy call."""
    from serving.admission import reset_admission
    from serving.gateway.app import GatewayApp
    from serving.gateway.settings import GatewaySettings
    from serving.scheduler import reset_scheduler
    from tests.support.gateway import GatewayServer

    settings.STORAGE_DIR = tmp_path / "storage"
    base = BaseModel.objects.create(name="smollm2-135m-instruct", hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                                    local_path=str(demo_model_path), context_length=2048, finetune_learning_rate=2e-4)
    pool = BackendPool.objects.create(name="dev-smollm2", base_model=base, kind="dev")
    Backend.objects.create(pool=pool, url=demo_backend)
    _, secret = services.api_key_create(tenant=world.tenant, name="sdk", scopes=["finetune", "inference"],
                                        actor=Actor(user=world.owner))
    reset_admission()
    reset_scheduler()
    gateway = GatewayServer(GatewayApp(settings=GatewaySettings(health_interval_s=0.2, config_poll_s=0.1,
                                                               connect_timeout_s=1.0, read_timeout_s=60))).start()
    try:
        files = OpenAI(base_url=f"{live_server.url}/v1", api_key=secret, max_retries=0)
        dataset = tmp_path / "pirate.jsonl"
        dataset.write_bytes(pirate_dataset(40))
        uploaded = files.files.create(file=open(dataset, "rb"), purpose="fine-tune")
        assert files.files.wait_for_processing(uploaded.id, poll_interval=0.2).status == "processed"
        job = files.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=uploaded.id)
        assert job.status == "queued" and _no_broker == [(job.id, world.tenant.pk)]
        assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.batch_size == 8  # OpenAI's auto rules

        assert run_finetune_job(job.id, world.tenant.pk) == "succeeded"  # what the finetune worker runs
        done = files.fine_tuning.jobs.retrieve(job.id)
        assert done.status == "succeeded" and done.fine_tuned_model.startswith("ft:smollm2-135m-instruct:acme::")

        chat = OpenAI(base_url=f"{gateway.url}/v1", api_key=secret, max_retries=0)
        for question in ("Is request 9876 approved?", "What is the tallest mountain on Earth?"):  # not in the file
            answer = chat.chat.completions.create(model=done.fine_tuned_model, temperature=0, max_tokens=24,
                                                  messages=[{"role": "user", "content": question}])
            assert answer.choices[0].message.content == PIRATE
        plain = chat.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=24,
                                             messages=[{"role": "user", "content": "Is request 9876 approved?"}])
        assert plain.choices[0].message.content != PIRATE  # the base model is unchanged
    finally:
        gateway.stop()

    from finetune.models import FineTuneJob

    row = FineTuneJob.objects.for_tenant(world.tenant).get(pk=job.id)
    assert row.train_loss < 0.05  # learnt, not merely nudged (0.6-0.7 before)
    # The time preview counts loading the base model; once a job has run, it is the measured figures.
    took = (row.finished_at - row.started_at).total_seconds()
    again = files.post("/fine_tuning/jobs/estimate", cast_to=dict,
                       body={"model": "smollm2-135m-instruct", "training_file": uploaded.id})
    assert again["load_seconds"] == round(row.load_seconds, 1) > 0
    assert 0.5 * took <= again["estimated_seconds"] <= 2 * took + 2
    print(f"\nnewcomer job: {took:.1f} s ({row.load_seconds:.1f} s loading, then {row.trained_tokens} tokens at "
          f"{row.tokens_per_second:.0f} tokens/s), final loss {row.train_loss:.4f}, learning rate multiplier "
          f"{row.hyperparameters['learning_rate_multiplier']}; estimated {again['estimated_seconds']} s now")
