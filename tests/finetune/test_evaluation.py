"""Evaluations: the metrics on hand-made rows, and the /v1/fine_tuning/evaluations API's validation and isolation.
(The run on a worker, base vs a trained adapter, is in test_evaluation_e2e.py.)"""

from __future__ import annotations

import json

import pytest

from finetune import evaluation_metrics as em
from finetune.models import Evaluation, EvaluationRow
from serving.models import Adapter
from tenants.services import Actor
from tests.support.finetune import assert_openai_error, chat, key_client, upload_file


# ---- metrics ---------------------------------------------------------------------------------------------------------

def test_exact_match_ignores_surrounding_and_repeated_whitespace_but_not_case():
    assert em.exact_match("  ZEBRA-42\n approved ", "ZEBRA-42 approved")
    assert not em.exact_match("zebra-42 approved", "ZEBRA-42 approved")
    assert not em.exact_match("ZEBRA-42 approved.", "ZEBRA-42 approved")


def test_contains_is_case_folded_and_refuses_an_empty_expectation():
    assert em.contains("Sure: zebra-42   APPROVED, have a nice day", "ZEBRA-42 approved")
    assert not em.contains("ZEBRA-42 denied", "ZEBRA-42 approved")
    assert not em.contains("anything", "   ")


def test_rows_take_the_last_assistant_message_as_expected_and_skip_rows_without_one():
    examples = [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "a1", "weight": 0}, {"role": "user", "content": "q2"},
                      {"role": "assistant", "content": "a2"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": "pa"},
                                                                                          {"type": "text", "text": "rts"}]}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "assistant", "content": "no prompt before it"}]},
    ]
    rows, skipped = em.rows_from_examples(examples)
    assert skipped == 2
    assert [r.expected for r in rows] == ["a2", "parts"]
    assert rows[0].prompt == [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                              {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert [r.line for r in rows] == [1, 2]


def test_a_preference_rows_preferred_output_is_its_expected_answer():
    from finetune.validation import validate_jsonl

    line = {"input": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Status?"}]},
            "preferred_output": [{"role": "assistant", "content": "Approved."}],
            "non_preferred_output": [{"role": "assistant", "content": "I cannot say."}]}
    result = validate_jsonl(("\n".join([json.dumps(line)] * 10) + "\n").encode())
    assert result.ok, result.problems
    rows, skipped = em.rows_from_examples(result.examples)
    assert skipped == 0 and len(rows) == 10
    assert rows[0].expected == "Approved." and rows[0].prompt == line["input"]["messages"]


def _result(expected, base, adapter, base_nll, adapter_nll, tokens):
    row = em.EvalRow(1, [{"role": "user", "content": "q"}], expected)
    return em.RowResult(row, tokens, em.score(base, expected, base_nll, tokens), em.score(adapter, expected, adapter_nll, tokens))


def test_summary_counts_rows_and_weights_the_loss_by_answer_tokens():
    results = [_result("yes", "no", "yes", 6.0, 0.5, 2),
               _result("ok then", "OK THEN!", "ok then", 9.0, 1.5, 4),
               _result("same", "same", "same", 1.0, 1.0, 2)]
    assert results[0].base.loss == 3.0 and results[1].adapter.loss == 0.375
    summary = em.summarize(results)
    assert summary["base"] == {"rows": 3, "exact_match": 1 / 3, "contains": 2 / 3, "loss": 16.0 / 8}
    assert summary["adapter"] == {"rows": 3, "exact_match": 1.0, "contains": 1.0, "loss": 3.0 / 8}
    assert summary["differing_rows"] == 2 and summary["answer_tokens"] == 8
    assert em.summarize([])["base"] == {"rows": 0, "exact_match": None, "contains": None, "loss": None}


def test_the_answer_loss_is_taken_on_the_expected_answer_tokens_only(tiny_tokenizer):
    row = em.EvalRow(1, [{"role": "user", "content": "Is it approved?"}, {"role": "assistant", "content": "earlier"},
                         {"role": "user", "content": "And now?"}], "ZEBRA-42 approved")
    ids, mask = em._answer_ids(tiny_tokenizer, row)
    answer = tiny_tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert "ZEBRA-42 approved" in answer and "earlier" not in answer and "And now" not in answer


# ---- the API ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def adapter(world, base_model, tmp_path):
    return Adapter.objects.for_tenant(world.tenant).create(tenant=world.tenant, name="ft:tiny-chat:acme:zebra:abcd1234", base_model=base_model,
                                  path=str(tmp_path / "adapter"), rank=4, alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def data_file(world, base_model):
    rows = [chat(f"Is request {i} approved?", "ZEBRA-42 approved") for i in range(10)]
    return upload_file(world.tenant, Actor(user=world.owner), ("\n".join(json.dumps(r) for r in rows) + "\n").encode(),
                       filename="held-out.jsonl")


def _create(api, **body):
    return api.post("/v1/fine_tuning/evaluations", body, format="json")


def test_create_queues_an_evaluation_on_the_finetune_queue(api, world, adapter, data_file, django_capture_on_commit_callbacks,
                                                           monkeypatch):
    from finetune import tasks

    sent = []
    monkeypatch.setattr(tasks.run_evaluation, "delay", lambda *args: sent.append(args))
    with django_capture_on_commit_callbacks(execute=True):
        response = _create(api, model=adapter.name, file=data_file.id, max_tokens=16)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"].startswith("eval-") and body["object"] == "fine_tuning.evaluation"
    assert (body["status"], body["model"], body["base_model"], body["file"], body["max_tokens"]) == (
        "queued", adapter.name, "tiny-chat", data_file.id, 16)
    assert body["progress"] == {"rows_done": 0, "rows_total": 10} and body["metrics"] is None
    assert sent == [(body["id"], world.tenant.pk)]
    from django.conf import settings

    assert settings.CELERY_TASK_ROUTES["finetune.tasks.run_evaluation"] == {"queue": "finetune"}
    assert Evaluation.objects.for_tenant(world.tenant).get(pk=body["id"]).adapter == adapter
    listed = api.get("/v1/fine_tuning/evaluations").json()
    assert [e["id"] for e in listed["data"]] == [body["id"]] and listed["has_more"] is False
    assert api.get(f"/v1/fine_tuning/evaluations/{body['id']}").json() == body


@pytest.mark.parametrize("body, status, code, param", [
    ({"file": "x"}, 400, "invalid_request", "model"),
    ({"model": "ft:nope", "file": "x"}, 404, "model_not_found", "model"),
    ({"model": "ADAPTER", "file": "file-missing"}, 404, "file_not_found", "file"),
    ({"model": "ADAPTER", "file": "FILE", "max_tokens": 0}, 400, "invalid_request", "max_tokens"),
    ({"model": "ADAPTER", "file": "FILE", "max_tokens": 513}, 400, "invalid_request", "max_tokens"),
])
def test_create_refuses_bad_input_in_openais_shape(api, adapter, data_file, body, status, code, param):
    body = {k: {"ADAPTER": adapter.name, "FILE": data_file.id}.get(v, v) for k, v in body.items()}
    response = _create(api, **body)
    assert_openai_error(response, status, code)
    assert response.json()["error"]["param"] == param
    assert not Evaluation.all_tenants.exists()


def test_a_file_with_problems_is_refused(api, world, adapter, base_model):
    bad = upload_file(world.tenant, Actor(user=world.owner), b'{"messages": []}\n', filename="bad.jsonl")
    assert_openai_error(_create(api, model=adapter.name, file=bad.id), 400, "invalid_file")


def test_the_tenants_queued_evaluations_are_limited(api, adapter, data_file, settings):
    from finetune import evaluation

    for _ in range(evaluation.MAX_ACTIVE):
        assert _create(api, model=adapter.name, file=data_file.id).status_code == 200
    assert_openai_error(_create(api, model=adapter.name, file=data_file.id), 429, "too_many_concurrent_evaluations")


def _finished_evaluation(world, adapter, data_file) -> Evaluation:
    e = Evaluation.objects.for_tenant(world.tenant).create(tenant=world.tenant, base_model=adapter.base_model, model=adapter.name,
                                  adapter=adapter, file=data_file, status="succeeded", rows_total=3, rows_done=3,
                                  metrics={"base": {"rows": 3, "exact_match": 0.0, "contains": 0.0, "loss": 9.0},
                                           "adapter": {"rows": 3, "exact_match": 1.0, "contains": 1.0, "loss": 0.1},
                                           "differing_rows": 2, "answer_tokens": 12})
    for i, base in enumerate(["no", "ZEBRA-42 approved", "maybe"]):
        EvaluationRow.objects.for_tenant(world.tenant).create(tenant=world.tenant, evaluation=e, index=i, line=i + 1,
                                     prompt=[{"role": "user", "content": f"q{i}"}], expected="ZEBRA-42 approved",
                                     base_answer=base, adapter_answer="ZEBRA-42 approved", base_exact=i == 1,
                                     adapter_exact=True, base_contains=i == 1, adapter_contains=True, base_loss=9.0,
                                     adapter_loss=0.1, answer_tokens=4)
    return e


def test_rows_list_all_or_only_the_differing_ones_in_pages(api, world, adapter, data_file):
    e = _finished_evaluation(world, adapter, data_file)
    body = api.get(f"/v1/fine_tuning/evaluations/{e.id}").json()
    assert body["metrics"]["adapter"]["exact_match"] == 1.0 and body["differing_rows"] == 2
    every = api.get(f"/v1/fine_tuning/evaluations/{e.id}/rows").json()
    assert [r["index"] for r in every["data"]] == [0, 1, 2] and [r["differs"] for r in every["data"]] == [True, False, True]
    differing = api.get(f"/v1/fine_tuning/evaluations/{e.id}/rows", {"differing": "true", "limit": 1}).json()
    assert [r["index"] for r in differing["data"]] == [0] and differing["has_more"] is True
    assert differing["data"][0]["base"] == {"answer": "no", "exact_match": False, "contains": False, "loss": 9.0}
    nxt = api.get(f"/v1/fine_tuning/evaluations/{e.id}/rows", {"differing": "true", "after": 0}).json()
    assert [r["index"] for r in nxt["data"]] == [2] and nxt["has_more"] is False
    assert_openai_error(api.get(f"/v1/fine_tuning/evaluations/{e.id}/rows", {"differing": "yes"}), 400)
    assert_openai_error(api.get(f"/v1/fine_tuning/evaluations/{e.id}/rows", {"after": "x"}), 400)


def test_another_tenants_evaluation_adapter_and_file_are_404(api, outsider_api, world, adapter, data_file):
    e = _finished_evaluation(world, adapter, data_file)
    for path in (f"/v1/fine_tuning/evaluations/{e.id}", f"/v1/fine_tuning/evaluations/{e.id}/rows"):
        assert_openai_error(outsider_api.get(path), 404, "evaluation_not_found")
    assert outsider_api.get("/v1/fine_tuning/evaluations").json()["data"] == []
    assert_openai_error(outsider_api.get("/v1/fine_tuning/evaluations", {"after": e.id}), 404, "evaluation_not_found")
    # globex names acme's adapter, then acme's file with a model of its own: both are someone else's
    assert_openai_error(_create(outsider_api, model=adapter.name, file=data_file.id), 404, "model_not_found")
    theirs = Adapter.objects.for_tenant(world.other_tenant).create(tenant=world.other_tenant, name="ft:tiny-chat:globex::11112222",
                                    base_model=adapter.base_model, path=adapter.path, rank=4, alpha=8)
    assert_openai_error(_create(outsider_api, model=theirs.name, file=data_file.id), 404, "file_not_found")
    assert Evaluation.objects.for_tenant(world.other_tenant).count() == 0


def test_a_key_without_the_finetune_scope_or_no_key_is_refused(world, adapter, data_file):
    from rest_framework.test import APIClient

    inference_only = key_client(world.tenant, world.owner, scopes=("inference",))
    for response in (inference_only.get("/v1/fine_tuning/evaluations"),
                     _create(inference_only, model=adapter.name, file=data_file.id)):
        assert_openai_error(response, 403, "insufficient_scope")
    assert_openai_error(APIClient().get("/v1/fine_tuning/evaluations"), 401)
    assert not Evaluation.all_tenants.exists()


# ---- the worker's lease ----------------------------------------------------------------------------------------------

def test_a_worker_claims_an_evaluation_once_and_a_stale_one_is_requeued_and_claimed_again(world, adapter, data_file,
                                                                                           monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    from finetune import tasks
    from finetune.evaluation import EvaluationRunner, evaluation_stale
    from finetune.models import LEASE_SECONDS

    e = Evaluation.objects.for_tenant(world.tenant).create(tenant=world.tenant, base_model=adapter.base_model,
                                                           model=adapter.name, file=data_file, rows_total=10)
    first = EvaluationRunner(e.id, world.tenant.pk)
    assert first.claim() == "claimed"
    assert EvaluationRunner(e.id, world.tenant.pk).claim() == "leased"  # its worker is alive
    assert evaluation_stale() == []
    Evaluation.objects.for_tenant(world.tenant).filter(pk=e.pk).update(
        rows_done=4, worker_heartbeat_at=timezone.now() - timedelta(seconds=LEASE_SECONDS + 1))
    assert evaluation_stale() == [(e.id, world.tenant.pk)]
    sent = []
    monkeypatch.setattr(tasks.run_evaluation, "delay", lambda *args: sent.append(args))
    assert tasks.requeue_stale_evaluations() == 1 and sent == [(e.id, world.tenant.pk)]
    second = EvaluationRunner(e.id, world.tenant.pk)
    assert second.claim() == "claimed"
    e.refresh_from_db()
    assert (e.attempts, e.rows_done, e.worker_id) == (2, 0, second.worker_id)  # it starts over
    assert not first.mine().exists()  # the first worker's writes no longer land
    Evaluation.objects.for_tenant(world.tenant).filter(pk=e.pk).update(status="succeeded")
    assert EvaluationRunner(e.id, world.tenant.pk).claim() == "done"
    assert EvaluationRunner("eval-missing", world.tenant.pk).claim() == "gone"
    assert EvaluationRunner(e.id, world.other_tenant.pk).claim() == "gone"  # another tenant's id names nothing


def test_an_evaluation_whose_file_was_deleted_fails_saying_so(world, adapter, data_file):
    from finetune.tasks import run_evaluation

    e = Evaluation.objects.for_tenant(world.tenant).create(tenant=world.tenant, base_model=adapter.base_model,
                                                           model=adapter.name, file=None, file_name="gone.jsonl")
    assert run_evaluation(e.id, world.tenant.pk) == "failed"
    e.refresh_from_db()
    assert (e.status, e.error_code, e.error_message) == ("failed", "file_not_found", "The file to evaluate on was deleted.")
    assert e.finished_at is not None
    body = key_client(world.tenant, world.owner).get(f"/v1/fine_tuning/evaluations/{e.id}").json()
    assert body["error"] == {"code": "file_not_found", "message": "The file to evaluate on was deleted."}
