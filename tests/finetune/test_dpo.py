"""Preference tuning (DPO): OpenAI's preference-data format validated line by line, the job API's `method` (parse,
errors, the method/file-format match, tenant isolation, scopes), the DPO loss on hand-computed numbers, sequence
log-probabilities packed as the trainer packs them, and the job page's rewards chart."""

from __future__ import annotations

import json
import math

import pytest
import torch

from finetune.dpo import DPOHyperparameters, dpo_loss, preferred_nll, sequence_logps, tokenize_pairs, train_dpo
from finetune.models import FineTuneJob
from finetune.services import DPO_AUTO_SFT_WEIGHT
from finetune.validation import preference_pair, validate_jsonl
from tests.support.finetune import (PREFERENCE_QUESTIONS, assert_openai_error, key_client, pair, preference_dataset, signed_in,
                                    upload, zebra_dataset)

# ---- validation ---------------------------------------------------------------------------------


GOOD = pair("hi")
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
CALL = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                             "function": {"name": "lookup", "arguments": "{\"id\": 1}"}}]}
LINES = [
    (GOOD, []),
    ({**GOOD, "input": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "Yes?"}, {"role": "user", "content": "again"}]}}, []),
    ({"input": {"messages": [{"role": "user", "content": "find 1"}], "tools": TOOLS},
      "preferred_output": [CALL], "non_preferred_output": [{"role": "assistant", "content": "no"}]}, []),
    ({"preferred_output": GOOD["preferred_output"], "non_preferred_output": GOOD["non_preferred_output"]},
     [("input", "missing_input")]),
    ({**GOOD, "input": "hi"}, [("input", "input_not_object")]),
    ({**GOOD, "input": {"messages": [{"role": "user", "content": "hi"}], "extra": 1}}, [("input.extra", "unknown_input_key")]),
    ({**GOOD, "input": {}}, [("input.messages", "missing_messages")]),
    ({**GOOD, "input": {"messages": "hi"}}, [("input.messages", "messages_not_list")]),
    ({**GOOD, "input": {"messages": []}}, [("input.messages", "messages_empty")]),
    ({**GOOD, "input": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}},
     [("input.messages[1].role", "input_last_not_user")]),
    ({**GOOD, "input": {"messages": [{"role": "user", "content": ""}]}}, [("input.messages[0].content", "empty_content")]),
    ({**GOOD, "input": {"messages": [{"role": "wizard", "content": "x"}]}}, [("input.messages[0].role", "invalid_role")]),
    ({**GOOD, "input": {"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"},
                                     {"role": "user", "content": "z"}]}}, [("input.messages[1].role", "system_not_first")]),
    ({**GOOD, "extra": 1}, [("extra", "unknown_key")]),
    ({"input": GOOD["input"], "non_preferred_output": GOOD["non_preferred_output"]},
     [("preferred_output", "missing_preferred_output")]),
    ({**GOOD, "non_preferred_output": []}, [("non_preferred_output", "invalid_non_preferred_output")]),
    ({**GOOD, "preferred_output": "yes"}, [("preferred_output", "invalid_preferred_output")]),
    ({**GOOD, "preferred_output": ["yes"]}, [("preferred_output[0]", "message_not_object")]),
    ({**GOOD, "preferred_output": [{"role": "user", "content": "yes"}]}, [("preferred_output[0].role", "output_not_assistant")]),
    ({**GOOD, "preferred_output": [{"role": "assistant", "content": "yes", "weight": 1}]},
     [("preferred_output[0].weight", "unknown_message_key")]),
    ({**GOOD, "non_preferred_output": [{"role": "assistant", "content": 5}]},
     [("non_preferred_output[0].content", "content_not_string")]),
    ({**GOOD, "non_preferred_output": GOOD["preferred_output"]}, [("non_preferred_output", "identical_outputs")]),
    ({"input": {"messages": [{"role": "user", "content": "find 1"}], "tools": TOOLS},
      "preferred_output": [{**CALL, "tool_calls": [{**CALL["tool_calls"][0], "function": {"name": "other", "arguments": "{}"}}]}],
      "non_preferred_output": [{"role": "assistant", "content": "no"}]},
     [("preferred_output[0].tool_calls[0].function.name", "undeclared_function")]),
    ({**GOOD, "input": {"messages": [{"role": "user", "content": "x"}], "tools": []}}, [("input.tools", "tools_empty")]),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, [("", "mixed_format")]),
]


def test_each_preference_line_is_checked_with_its_own_paths_and_codes():
    data = "\n".join(json.dumps(line) for line, _ in LINES).encode()
    result = validate_jsonl(data, filename="prefs.jsonl", min_examples=1)
    got = {}
    for p in result.problems:
        got.setdefault(p.line, []).append((p.path, p.code))
        assert p.message
    assert got == {n: expected for n, (_, expected) in enumerate(LINES, start=1) if expected}
    assert result.format == "preference" and result.example_count == 3  # the three good lines
    ex = result.examples[1]
    chosen, rejected = preference_pair(ex)
    assert chosen[2] == {"role": "assistant", "content": "Yes?", "weight": 0}  # the input's answer is context only
    assert chosen[-1] == GOOD["preferred_output"][0] and rejected[-1] == GOOD["non_preferred_output"][0]


def test_a_file_of_good_pairs_is_ok_and_counts_both_conversations_tokens(tiny_tokenizer):
    from finetune.templating import tokenize_chat_example

    result = validate_jsonl(preference_dataset(12), filename="prefs.jsonl", tokenizer=tiny_tokenizer, context_length=1024)
    assert result.ok and result.stats()["format"] == "preference" and result.example_count == 12
    chosen, rejected = preference_pair(result.examples[0])
    ids_c, mask_c = tokenize_chat_example(tiny_tokenizer, chosen)
    ids_r, mask_r = tokenize_chat_example(tiny_tokenizer, rejected)
    assert result.examples[0].total_tokens == len(ids_c) + len(ids_r)
    assert result.examples[0].trainable_tokens == sum(mask_c) + sum(mask_r) > 0
    # an output that does not fit the context is that output's problem
    short = validate_jsonl(preference_dataset(12), filename="p.jsonl", tokenizer=tiny_tokenizer,
                           context_length=len(ids_r))
    codes = {(p.line, p.path, p.code) for p in short.problems}
    assert (1, "preferred_output", "too_long") in codes and (1, "non_preferred_output", "too_long") not in codes


# ---- the loss ----------------------------------------------------------------------------------


def test_dpo_loss_and_rewards_match_hand_computed_numbers():
    # policy log-probs: chosen -1, rejected -3; reference: both -2; beta 0.5
    # chosen reward = 0.5·(−1 − −2) = 0.5; rejected = 0.5·(−3 − −2) = −0.5; loss = −log σ(1) = log(1 + e^−1)
    loss, chosen, rejected = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -2.0]),
                                      torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), beta=0.5)
    assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, 0.0]
    assert loss[0].item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)  # 0.3132617
    assert loss[1].item() == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference: log 2
    # gradient: d loss / d policy_chosen = −beta·σ(−margin)
    pc = torch.tensor([-1.0], requires_grad=True)
    dpo_loss(pc, torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)[0].sum().backward()
    assert pc.grad.item() == pytest.approx(-0.5 / (1 + math.e), abs=1e-6)


def test_beta_must_be_positive():
    with pytest.raises(ValueError, match="beta"):
        DPOHyperparameters.coerce({"beta": 0})
    assert DPOHyperparameters.coerce({"beta": 0.3, "batch_size": 2}).beta == 0.3


def test_sft_weight_adds_the_preferred_outputs_loss_per_token():
    with pytest.raises(ValueError, match="sft_weight"):
        DPOHyperparameters.coerce({"sft_weight": -0.5})
    assert DPOHyperparameters.coerce({}).sft_weight == 0.0  # DPO alone unless asked
    # chosen log-probs −6 over 3 tokens and −2 over 4: NLL per token 2 and 0.5
    assert preferred_nll(torch.tensor([-6.0, -2.0]), [3, 4]).tolist() == [2.0, 0.5]
    from finetune.errors import FinetuneError
    from finetune.services import resolve_hyperparameters

    with pytest.raises(FinetuneError, match="unknown hyperparameters: sft_weight"):  # DPO's, not a supervised job's
        resolve_hyperparameters({"sft_weight": 1}, 40)


@pytest.mark.slow
def test_training_with_sft_weight_reports_the_preferred_answers_loss_and_lowers_it(tiny_model_path, tiny_tokenizer, tmp_path):
    """Same pairs, seed and steps: with sft_weight 1 the preferred answers' own loss (train_preferred_nll, in the
    metrics) goes down over training and ends lower than DPO alone leaves it; DPO's loss and rewards are still reported."""
    examples = [pair(PREFERENCE_QUESTIONS[i % len(PREFERENCE_QUESTIONS)].format(i=i)) for i in range(8)]
    hp = {"n_epochs": 3, "batch_size": 4, "learning_rate": 5e-3, "log_every": 1, "max_seq_len": 256}
    pairs = tokenize_pairs(tiny_tokenizer, examples, 256)

    def run(sft_weight, out):
        events = []
        result = train_dpo(base_model_path=tiny_model_path, base_model_id="tiny-chat", train_examples=examples,
                           output_dir=out, hyperparameters={**hp, "sft_weight": sft_weight}, on_event=events.append,
                           device="cpu")
        assert result.status == "succeeded"
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32),
                                          str(result.adapter_dir)).eval()
        with torch.no_grad():
            chosen = sequence_logps(model, [p.chosen for p in pairs], 256, 0, "cpu")
        nll = preferred_nll(chosen, [p.chosen.trainable for p in pairs]).mean().item()
        return [e for e in events if e["type"] == "metrics"], nll

    plain_metrics, plain_nll = run(0.0, tmp_path / "plain")
    sft_metrics, sft_nll = run(1.0, tmp_path / "sft")
    assert all("train_preferred_nll" not in m for m in plain_metrics)
    assert all("train_preferred_nll" in m and "train_reward_margin" in m for m in sft_metrics)
    assert sft_metrics[-1]["train_preferred_nll"] < sft_metrics[0]["train_preferred_nll"]
    assert sft_nll < plain_nll, (sft_nll, plain_nll)


def test_packed_sequence_log_probs_equal_each_sequence_scored_alone(tiny_model_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    pairs = tokenize_pairs(tiny_tokenizer, [pair(PREFERENCE_QUESTIONS[i].format(i=i)) for i in range(3)], 1024)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    seqs = [t for p in pairs for t in (p.chosen, p.rejected)]
    with torch.no_grad():
        packed = sequence_logps(model, seqs, 1024, 0, "cpu")
        for k, t in enumerate(seqs):
            logits = model(torch.tensor([t.input_ids])).logits[0].float()
            targets = torch.tensor(t.targets)
            keep = targets != -100
            alone = torch.log_softmax(logits[keep], -1).gather(1, targets[keep][:, None]).sum()
            assert packed[k].item() == pytest.approx(alone.item(), abs=1e-4)
    # only the output is scored: the chosen and rejected inputs are the same, their outputs differ
    assert pairs[0].chosen.input_ids[:5] == pairs[0].rejected.input_ids[:5]
    assert pairs[0].chosen.trainable != pairs[0].rejected.trainable or packed[0] != packed[1]


# ---- the job API ---------------------------------------------------------------------------------


def dpo_job(api, file_id: str, hyperparameters: dict | None = None, **extra):
    body = {"model": "tiny-chat", "training_file": file_id, "suffix": "prefs",
            "method": {"type": "dpo", "dpo": {"hyperparameters": hyperparameters or {}}}}
    return api.post("/v1/fine_tuning/jobs", {**body, **extra}, format="json")


@pytest.fixture
def prefs(api, base_model):
    response = upload(api, preference_dataset(12), name="prefs.jsonl")
    assert response.status_code == 200, response.content
    return response.json()["id"]


def test_a_dpo_job_is_created_with_its_method_and_returns_it_as_openai_does(api, prefs):
    response = dpo_job(api, prefs, {"beta": 0.25, "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": "auto"})
    assert response.status_code == 200, response.content
    job = response.json()
    assert job["method"]["type"] == "dpo"
    hp = job["method"]["dpo"]["hyperparameters"]
    assert hp["beta"] == 0.25 and hp["n_epochs"] == 2 and hp["batch_size"] == 4 and hp["learning_rate_multiplier"] > 0
    assert "supervised" not in job["method"] and job["hyperparameters"] == hp
    row = FineTuneJob.all_tenants.get(pk=job["id"])
    assert row.method == "dpo" and row.hyperparameters["beta"] == 0.25
    assert api.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["method"] == job["method"]
    # "auto" beta is OpenAI's 0.1; the estimate takes the same body
    auto = dpo_job(api, prefs, {"beta": "auto"}).json()
    assert auto["method"]["dpo"]["hyperparameters"]["beta"] == 0.1
    estimate = api.post("/v1/fine_tuning/jobs/estimate", {"model": "tiny-chat", "training_file": prefs,
                                                            "method": {"type": "dpo"}}, format="json")
    assert estimate.status_code == 200 and estimate.json()["method"] == "dpo"
    assert estimate.json()["hyperparameters"]["beta"] == 0.1
    assert auto["method"]["dpo"]["hyperparameters"]["sft_weight"] == DPO_AUTO_SFT_WEIGHT


def test_a_dpo_jobs_sft_weight_is_kept_as_asked_and_returned(api, prefs):
    # the platform's sft_weight (the preferred answers' own loss, weighted): a number as asked, 0 allowed
    weighted = dpo_job(api, prefs, {"sft_weight": 0.5}).json()
    assert weighted["method"]["dpo"]["hyperparameters"]["sft_weight"] == 0.5
    assert FineTuneJob.all_tenants.get(pk=weighted["id"]).hyperparameters["sft_weight"] == 0.5
    plain = dpo_job(api, prefs, {"sft_weight": 0}).json()
    assert plain["method"]["dpo"]["hyperparameters"]["sft_weight"] == 0


def test_supervised_jobs_keep_returning_their_method_and_top_level_hyperparameters_still_work(api, base_model):
    file_id = upload(api, zebra_dataset()).json()["id"]
    job = api.post("/v1/fine_tuning/jobs", {"model": "tiny-chat", "training_file": file_id,
                                            "hyperparameters": {"n_epochs": 2}}, format="json").json()
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": job["hyperparameters"]}}
    assert job["hyperparameters"]["n_epochs"] == 2 and FineTuneJob.all_tenants.get(pk=job["id"]).method == "supervised"


@pytest.mark.parametrize("method, param, code", [
    ({"type": "reinforcement"}, "method.type", "invalid_method"),
    ({"type": "dpo", "supervised": {}}, "method.supervised", "invalid_method"),
    ({"type": "dpo", "dpo": "fast"}, "method.dpo", "invalid_method"),
    ({"type": "dpo", "dpo": {"settings": {}}}, "method.dpo.settings", "invalid_method"),
    ({"type": "dpo", "dpo": {"hyperparameters": [1]}}, "method.dpo.hyperparameters", "invalid_method"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": "high"}}}, "beta", "invalid_hyperparameter"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}, "beta", "invalid_hyperparameter"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": True}}}, "beta", "invalid_hyperparameter"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 0}}}, "n_epochs", "invalid_hyperparameter"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 1.5}}}, "batch_size", "invalid_hyperparameter"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"gamma": 1}}}, "hyperparameters", "invalid_hyperparameter"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"sft_weight": -1}}}, "sft_weight", "invalid_hyperparameter"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"sft_weight": 11}}}, "sft_weight", "invalid_hyperparameter"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"sft_weight": "some"}}}, "sft_weight", "invalid_hyperparameter"),
])
def test_method_errors_name_the_field_at_fault(api, prefs, method, param, code):
    for endpoint in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/estimate"):
        response = api.post(endpoint, {"model": "tiny-chat", "training_file": prefs, "method": method}, format="json")
        assert_openai_error(response, 400, code)
        assert response.json()["error"]["param"] == param
    assert not FineTuneJob.all_tenants.exists()


def test_the_method_must_match_the_files_format(api, prefs):
    chat = upload(api, zebra_dataset()).json()["id"]
    response = dpo_job(api, chat)
    assert_openai_error(response, 400, "wrong_file_format")
    assert response.json()["error"]["param"] == "training_file" and "preference" in response.json()["error"]["message"]
    response = api.post("/v1/fine_tuning/jobs", {"model": "tiny-chat", "training_file": prefs}, format="json")
    assert_openai_error(response, 400, "wrong_file_format")  # supervised (the default) on preference data
    assert "method type 'dpo'" in response.json()["error"]["message"]
    response = api.post("/v1/fine_tuning/jobs", {"model": "tiny-chat", "training_file": prefs, "method": {
        "type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}}, format="json")
    assert response.status_code == 400  # beta is DPO's
    response = dpo_job(api, prefs, validation_file=chat)
    assert_openai_error(response, 400, "wrong_file_format")
    assert response.json()["error"]["param"] == "validation_file"
    assert not FineTuneJob.all_tenants.exists()


def test_dpo_jobs_and_files_of_another_tenant_are_404_and_a_key_without_the_scope_is_403(api, outsider_api, world, prefs):
    job_id = dpo_job(api, prefs).json()["id"]
    for url in ("", "/events", "/checkpoints"):
        assert_openai_error(outsider_api.get(f"/v1/fine_tuning/jobs/{job_id}{url}"), 404, "job_not_found")
    assert_openai_error(dpo_job(outsider_api, prefs), 404, "file_not_found")
    inference_only = key_client(world.tenant, world.owner, scopes=("inference",))
    assert_openai_error(dpo_job(inference_only, prefs), 403, "insufficient_scope")
    assert_openai_error(inference_only.get(f"/v1/fine_tuning/jobs/{job_id}"), 403, "insufficient_scope")
    assert FineTuneJob.all_tenants.count() == 1


def test_the_job_page_charts_a_dpo_jobs_rewards_for_members_only(api, world, prefs):
    from finetune.services import _event

    job = FineTuneJob.all_tenants.get(pk=dpo_job(api, prefs).json()["id"])
    _event(job, "Step 1/2", type="metrics", data={"step": 1, "total_steps": 2, "train_loss": 0.69,
                                                   "train_reward_margin": 0.0, "train_reward_accuracy": 0.0,
                                                   "train_chosen_reward": 0.0, "train_rejected_reward": 0.0})
    _event(job, "Step 2/2", type="metrics", data={"step": 2, "total_steps": 2, "train_loss": 0.4,
                                                   "train_reward_margin": 0.6, "train_reward_accuracy": 1.0,
                                                   "train_chosen_reward": 0.2, "train_rejected_reward": -0.4})
    url = f"/t/acme/finetune/jobs/{job.id}/"
    page = signed_in(world.viewer).get(url)
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="ft-rewards"' in html and "preference tuning (DPO, beta 0.1, preferred-answer weight 1.0)" in html
    series = json.loads(html.split('id="ft-loss" type="application/json">')[1].split("</script>")[0])
    assert series[1]["train_reward_margin"] == 0.6 and series[1]["train_reward_accuracy"] == 1.0
    status = signed_in(world.viewer).get(url + "status/").json()
    assert status["loss"][1]["train_chosen_reward"] == 0.2
    assert signed_in(world.viewer).post(url + "cancel/").status_code == 403  # viewers read, developers cancel
    assert signed_in(world.outsider).get(url).status_code == 404
    # a supervised job's page has no rewards chart
    sup = FineTuneJob.all_tenants.create(tenant=world.tenant, base_model=job.base_model, training_file=job.training_file,
                                     hyperparameters={"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1})
    assert 'id="ft-rewards"' not in signed_in(world.viewer).get(f"/t/acme/finetune/jobs/{sup.id}/").content.decode()
