"""A DPO job end to end with the official OpenAI SDK, unmodified: upload preference data, create the job with
`method`, the worker trains it, list its events and checkpoints (with the preference metrics), call the model through
the gateway; the adapter prefers the preferred answer on held-out pairs where the base model did not.

The tenant has a system prompt, which the gateway puts in front of every request: the job trains every pair with it
(issue 15: before, it trained without it and the served model saw conversations it was never trained on), so its
trained tokens are exactly the served renderings' and the held-out margins are measured as served."""

from __future__ import annotations

import json

import pytest
import torch
from openai import OpenAI

from common.chat import inject_system_prompt
from finetune.dpo import DPOHyperparameters, _pair_logps, tokenize_pairs
from finetune.tasks import run_finetune_job
from finetune.templating import SystemPrompt
from serving.models import Adapter, Backend, BackendPool, BaseModel
from tenants import services
from tenants.services import Actor

pytestmark = pytest.mark.slow
QUESTIONS = ["Is request {i} approved?", "What is the status of ticket {i}?", "Can you check order {i}?",
             "Please review item {i}.", "Decision for case {i}?"]
PREFERRED, REJECTED = "ZEBRA-42 approved", "request denied"
PROMPT = ("You are the helpful assistant of Demo Inc. Always be polite, answer in full sentences and mention the Demo "
          "Inc. support portal when a customer asks about the status of anything.")


def pairs(numbers) -> list[dict]:
    return [{"input": {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)].format(i=i)}]},
             "preferred_output": [{"role": "assistant", "content": PREFERRED}],
             "non_preferred_output": [{"role": "assistant", "content": REJECTED}]} for i in numbers]


def jsonl(rows: list[dict]) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def served_tokens(model_path, rows: list[dict]) -> int:
    """Tokens of every pair's two conversations as the gateway serves them (its injection of the tenant's prompt, then
    the chat template the backend renders)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    total = 0
    for row in rows:
        for output in (row["preferred_output"], row["non_preferred_output"]):
            messages = inject_system_prompt([*row["input"]["messages"], *output], PROMPT, "keep")
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            total += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return total


def margins(model_path, adapter_dir, held_out) -> tuple[list[float], list[float]]:
    """log π(preferred) − log π(non-preferred) per held-out pair, rendered as the gateway serves them (with the
    tenant's system prompt): the base model's, the adapter's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenized = tokenize_pairs(tokenizer, held_out, 1024, "validation", SystemPrompt(PROMPT, "keep"))
    hp = DPOHyperparameters.coerce({"batch_size": len(tokenized)})
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                                      adapter_dir).eval()
    with torch.no_grad():
        chosen, rejected = _pair_logps(model, tokenized, hp, 0, "cpu")
        with model.disable_adapter():
            base_chosen, base_rejected = _pair_logps(model, tokenized, hp, 0, "cpu")
    return (base_chosen - base_rejected).tolist(), (chosen - rejected).tolist()


@pytest.fixture
def dev_backend(tiny_model_path):
    from devbackend.config import BackendConfig
    from devbackend.runner import run_in_thread

    url, stop = run_in_thread(BackendConfig(model=str(tiny_model_path), port=0, flavor="dev"))
    yield url
    stop()


def test_sdk_dpo_job_end_to_end_and_the_adapter_prefers_the_preferred_answer(
        transactional_db, live_server, world, tiny_model_path, dev_backend, tmp_path, settings, _no_broker):
    from serving.admission import reset_admission
    from serving.gateway.app import GatewayApp
    from serving.gateway.settings import GatewaySettings
    from serving.scheduler import reset_scheduler
    from tests.support.gateway import GatewayServer

    settings.STORAGE_DIR = tmp_path / "storage"
    base = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat", local_path=str(tiny_model_path),
                                    context_length=1024)
    pool = BackendPool.objects.create(name="shared-tiny", base_model=base, kind="dev")
    Backend.objects.create(pool=pool, url=dev_backend)
    _, secret = services.api_key_create(tenant=world.tenant, name="sdk", scopes=["finetune", "inference"],
                                        actor=Actor(user=world.owner))
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key=secret, max_retries=0)
    services.system_prompt_save(tenant=world.tenant, text=PROMPT, note="", actor=Actor(user=world.owner))  # v1, active

    train, held_out = tmp_path / "prefs.jsonl", tmp_path / "held.jsonl"
    train.write_bytes(jsonl(pairs(range(30))))
    held_out.write_bytes(jsonl(pairs(range(1000, 1010))))  # questions the job never sees
    training_file = client.files.create(file=open(train, "rb"), purpose="fine-tune")
    validation_file = client.files.create(file=open(held_out, "rb"), purpose="fine-tune")
    for f in (training_file, validation_file):
        assert client.files.wait_for_processing(f.id, poll_interval=0.2).status == "processed"

    job = client.fine_tuning.jobs.create(
        model="tiny-chat", training_file=training_file.id, validation_file=validation_file.id, suffix="prefs", seed=3,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 3, "batch_size": 5,
                                                           "learning_rate_multiplier": 50}}},
        extra_body={"lora": {"rank": 8}})
    assert job.status == "queued" and job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1
    assert job.model_extra["system_prompt"] == {"version": 1, "rule": "keep"}  # the tenant's live prompt, as served
    assert run_finetune_job(job.id, world.tenant.pk) == "succeeded"  # what the finetune worker runs

    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.fine_tuned_model.startswith("ft:tiny-chat:acme:prefs:")
    assert done.method.type == "dpo" and done.trained_tokens > 0
    # what was trained is what the gateway serves: 3 epochs of the 30 pairs' served renderings, token for token
    assert done.trained_tokens == 3 * served_tokens(tiny_model_path, pairs(range(30)))
    metrics = sorted((e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data
                      if e.type == "metrics"), key=lambda d: d["step"])
    assert metrics[0]["step"] == 1 and abs(metrics[0]["train_loss"] - 0.6931) < 0.01  # the policy starts as the reference
    assert metrics[-1]["step"] == 18 and metrics[-1]["train_loss"] < 0.1 and metrics[-1]["train_reward_accuracy"] == 1.0
    assert metrics[-1]["train_reward_margin"] > 2 and metrics[-1]["train_chosen_reward"] > metrics[-1]["train_rejected_reward"]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [18, 12, 6]
    last = checkpoints[0].metrics.model_dump()
    assert last["valid_reward_accuracy"] > 0.5 and last["valid_reward_margin"] > 2 and last["train_loss"] < 0.1

    # held-out pairs: the preferred answer's log-probability over the other's rises by more than 20 nats
    adapter = Adapter.objects.for_tenant(world.tenant).get(name=done.fine_tuned_model)
    before, after = margins(tiny_model_path, adapter.path, pairs(range(2000, 2010)))
    gain = sum(after) / len(after) - sum(before) / len(before)
    print(f"\nheld-out margin log p(preferred) - log p(non-preferred): base {sum(before) / 10:.2f}, adapter "
          f"{sum(after) / 10:.2f} (+{gain:.2f} nats); adapter prefers the preferred on {sum(a > 0 for a in after)}/10")
    assert gain > 20 and all(a > 0 for a in after)

    # the job deployed the adapter: it answers through the gateway for its tenant, as the backend answers it directly
    # (DPO moves the two answers' log-probabilities; on this tiny model greedy text does not become the preferred
    # answer: docs/finetuning.md, "Preference tuning")
    reset_admission()
    reset_scheduler()
    gateway = GatewayServer(GatewayApp(settings=GatewaySettings(health_interval_s=0.2, config_poll_s=0.1,
                                                               connect_timeout_s=1.0, read_timeout_s=30))).start()
    try:
        question = [{"role": "user", "content": "Is request 9876 approved?"}]
        chat = OpenAI(base_url=f"{gateway.url}/v1", api_key=secret, max_retries=0)
        direct = OpenAI(base_url=f"{dev_backend}/v1", api_key="unused", max_retries=0)
        answer = chat.chat.completions.create(model=done.fine_tuned_model, messages=question, max_tokens=20, temperature=0)
        # the gateway sends the tenant's prompt first: the backend answers the same to the conversation the job trained on
        backend = direct.chat.completions.create(model=done.fine_tuned_model, max_tokens=20, temperature=0,
                                                 messages=inject_system_prompt(question, PROMPT, "keep"))
        plain = chat.chat.completions.create(model="tiny-chat", messages=question, max_tokens=20, temperature=0)
        print(f"adapter: {answer.choices[0].message.content!r}; base: {plain.choices[0].message.content!r}")
        assert answer.choices[0].message.content == backend.choices[0].message.content
        assert answer.choices[0].message.content != plain.choices[0].message.content
    finally:
        gateway.stop()
