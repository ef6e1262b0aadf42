"""Console pages of evaluations: start one (developers and above, this tenant's adapters and files only), the page
with the comparison table, its chart and table view, the differing rows, and the running state's progress."""

from __future__ import annotations

import json

import pytest

from finetune.models import Evaluation, EvaluationRow, FineTuneJob, JobCheckpoint
from serving.models import Adapter
from tenants.services import Actor
from tests.support.finetune import chat, signed_in, upload_file

PAGE = "/t/acme/finetune/evaluations/"


@pytest.fixture
def adapter(world, base_model, tmp_path):
    return Adapter.objects.for_tenant(world.tenant).create(
        tenant=world.tenant, name="ft:tiny-chat:acme:zebra:abcd1234", base_model=base_model,
        path=str(tmp_path / "adapter"), rank=4, alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def data_file(world, base_model):
    rows = [chat(f"Is request {i} approved?", "ZEBRA-42 approved") for i in range(10)]
    return upload_file(world.tenant, Actor(user=world.owner), ("\n".join(json.dumps(r) for r in rows) + "\n").encode(),
                       filename="held-out.jsonl")


def _evaluation(world, adapter, data_file, **fields) -> Evaluation:
    defaults = dict(tenant=world.tenant, base_model=adapter.base_model, model=adapter.name, adapter=adapter,
                    file=data_file, file_name=data_file.filename, status="succeeded", rows_total=3, rows_done=3,
                    metrics={"base": {"rows": 3, "exact_match": 1 / 3, "contains": 1 / 3, "loss": 9.5},
                             "adapter": {"rows": 3, "exact_match": 1.0, "contains": 1.0, "loss": 0.25},
                             "differing_rows": 2, "answer_tokens": 12})
    e = Evaluation.objects.for_tenant(world.tenant).create(**{**defaults, **fields})
    if e.status == "succeeded":
        for i, base in enumerate(["Denied, sorry", "ZEBRA-42 approved", "I cannot tell"]):
            EvaluationRow.objects.for_tenant(world.tenant).create(
                tenant=world.tenant, evaluation=e, index=i, line=i + 1,
                prompt=[{"role": "system", "content": "bot"}, {"role": "user", "content": f"Question number {i}?"}],
                expected="ZEBRA-42 approved", base_answer=base, adapter_answer="ZEBRA-42 approved",
                base_exact=i == 1, adapter_exact=True, base_contains=i == 1, adapter_contains=True, base_loss=9.5,
                adapter_loss=0.25, answer_tokens=4)
    return e


def test_a_developer_starts_an_evaluation_from_the_form(world, adapter, data_file, monkeypatch):
    from finetune import tasks

    monkeypatch.setattr(tasks.run_evaluation, "delay", lambda *args: None)
    page = signed_in(world.developer).get(PAGE, {"model": adapter.name})
    assert page.status_code == 200
    html = page.content.decode()
    assert f'<option value="{adapter.name}" selected>' in html and data_file.id in html
    response = signed_in(world.developer).post(PAGE, {"model": adapter.name, "file": data_file.id, "max_tokens": "32"})
    created = Evaluation.objects.for_tenant(world.tenant).get()
    assert response.status_code == 302 and response["Location"] == f"{PAGE}{created.id}/"
    assert (created.model, created.file_id, created.max_tokens, created.status) == (adapter.name, data_file.id, 32, "queued")


def test_a_viewer_reads_but_cannot_start_one(world, adapter, data_file):
    e = _evaluation(world, adapter, data_file)
    viewer = signed_in(world.viewer)
    assert viewer.get(PAGE).status_code == 200 and viewer.get(f"{PAGE}{e.id}/").status_code == 200
    response = viewer.post(PAGE, {"model": adapter.name, "file": data_file.id, "max_tokens": "32"})
    assert response.status_code == 403
    assert Evaluation.objects.for_tenant(world.tenant).count() == 1


def test_the_form_offers_only_this_tenants_adapters_and_files(world, adapter, data_file, base_model):
    theirs = Adapter.objects.for_tenant(world.other_tenant).create(
        tenant=world.other_tenant, name="ft:tiny-chat:globex::99998888", base_model=base_model, path="x", rank=4)
    their_file = upload_file(world.other_tenant, Actor(user=world.outsider), b"".join(
        json.dumps(chat(f"q{i}", "a")).encode() + b"\n" for i in range(10)), filename="theirs.jsonl")
    html = signed_in(world.developer).get(PAGE).content.decode()
    assert theirs.name not in html and their_file.id not in html
    for body in ({"model": theirs.name, "file": data_file.id}, {"model": adapter.name, "file": their_file.id}):
        response = signed_in(world.developer).post(PAGE, {**body, "max_tokens": "8"})
        assert response.status_code == 400 and "not one of the available choices" in response.content.decode()
    assert not Evaluation.all_tenants.exists()


def test_another_tenants_evaluation_is_404(world, adapter, data_file):
    e = _evaluation(world, adapter, data_file)
    outsider = signed_in(world.outsider)
    for url in (f"/t/globex/finetune/evaluations/{e.id}/", f"/t/globex/finetune/evaluations/{e.id}/status/"):
        assert outsider.get(url).status_code == 404
    assert outsider.get(f"{PAGE}{e.id}/").status_code in (403, 404)  # not a member of acme
    assert e.id not in outsider.get("/t/globex/finetune/evaluations/").content.decode()


def test_the_page_compares_base_and_adapter_with_a_chart_and_the_differing_rows(world, adapter, data_file):
    e = _evaluation(world, adapter, data_file)
    html = signed_in(world.viewer).get(f"{PAGE}{e.id}/").content.decode()
    table = html[html.index('id="ft-eval-table"'):html.index("</table>", html.index('id="ft-eval-table"'))]
    assert "Exact match" in table and "33 %" in table and "<strong>100 %</strong>" in table
    assert "<strong>0.250</strong>" in table and "9.500" in table  # the lower loss is the better one
    assert 'class="chart' in html and "Table view" in html and "Exact match · adapter" in html
    rows = html[html.index('id="ft-eval-rows-table"'):]
    assert "Rows where the answers differ (2 of 3)" in html
    assert "Question number 0?" in rows and "Denied, sorry" in rows and "Question number 2?" in rows
    assert "Question number 1?" not in rows  # the same answer on both sides
    listed = signed_in(world.viewer).get(PAGE).content.decode()
    assert e.id in listed and "33 % → 100 %" in listed


def test_a_running_evaluation_shows_its_progress_and_the_status_json(world, adapter, data_file):
    e = _evaluation(world, adapter, data_file, status="running", rows_total=10, rows_done=3, metrics={})
    html = signed_in(world.viewer).get(f"{PAGE}{e.id}/").content.decode()
    assert "3 of 10 rows done" in html and 'data-finished="0"' in html and 'value="30"' in html
    assert "Base model vs adapter" not in html
    status = signed_in(world.viewer).get(f"{PAGE}{e.id}/status/").json()
    assert (status["rows_done"], status["rows_total"], status["progress"], status["finished"]) == (3, 10, 30, False)


def test_the_job_page_lists_checkpoints_with_validation_metrics_and_evaluate_links(world, base_model, data_file):
    job = FineTuneJob.objects.for_tenant(world.tenant).create(
        tenant=world.tenant, base_model=base_model, training_file=data_file, validation_file=data_file,
        status="succeeded", fine_tuned_model="ft:tiny-chat:acme::12345678", hyperparameters={"n_epochs": 1},
        lora={"rank": 4})
    ckpt = JobCheckpoint.objects.for_tenant(world.tenant).create(
        tenant=world.tenant, job=job, step=10, epoch=1, path="x",
        metrics={"step": 10, "train_loss": 1.23456, "valid_loss": 2.5, "full_valid_loss": 2.5,
                 "valid_mean_token_accuracy": 0.75, "full_valid_mean_token_accuracy": 0.75})
    html = signed_in(world.developer).get(f"/t/acme/finetune/jobs/{job.id}/").content.decode()
    assert "1.2346" in html and "2.5000" in html and "75 %" in html
    assert f"{PAGE}?model={ckpt.public_id}" in html and "?model=ft%3Atiny-chat%3Aacme%3A%3A12345678" in html
    assert f"{PAGE}?model=" not in signed_in(world.viewer).get(f"/t/acme/finetune/jobs/{job.id}/").content.decode()
