"""The evaluation page in a browser: a developer starts one from a job's checkpoint table, follows its progress while
a worker runs it, and reads the comparison once it is done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.models import Evaluation, EvaluationRow, FineTuneJob
from serving.models import Adapter, BaseModel
from tenants.services import Actor
from tests.support.browser import sign_in
from tests.support.finetune import chat, upload_file

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="browser tests need Debian's Chromium at /usr/bin/chromium"),
]

expect = pytest.importorskip("playwright.sync_api", reason="needs the 'playwright' package").expect


def test_start_an_evaluation_follow_its_progress_and_read_the_comparison(page, world, tiny_model_path, settings,
                                                                         tmp_path, monkeypatch):
    from finetune import tasks

    settings.STORAGE_DIR = tmp_path / "storage"
    monkeypatch.setattr(tasks.run_evaluation, "delay", lambda *args: None)  # the worker's part is played below
    monkeypatch.setattr(tasks.validate_training_file, "delay", lambda *args: tasks.validate_training_file(*args))
    base = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat", local_path=str(tiny_model_path),
                                    context_length=1024)
    rows = [chat(f"Is request {i} approved?", "ZEBRA-42 approved") for i in range(10)]
    file = upload_file(world.tenant, Actor(user=world.owner), ("\n".join(json.dumps(r) for r in rows) + "\n").encode(),
                       filename="held-out.jsonl")
    adapter = Adapter.all_tenants.create(tenant=world.tenant, name="ft:tiny-chat:acme:zebra:1", base_model=base,
                                         path=str(tmp_path / "adapter"), rank=4)
    job = FineTuneJob.all_tenants.create(tenant=world.tenant, base_model=base, training_file=file, status="succeeded",
                                         fine_tuned_model=adapter.name, adapter=adapter,
                                         hyperparameters={"n_epochs": 1, "batch_size": 8}, lora={"rank": 4})
    job.checkpoints.create(tenant=world.tenant, step=2, epoch=1, path="x", metrics={"train_loss": 0.5, "valid_loss": 0.7})

    sign_in(page, world.developer.email)
    page.goto(f"/t/acme/finetune/jobs/{job.id}/")
    page.get_by_role("link", name=f"Evaluate {adapter.name} against its base model").click()
    expect(page.get_by_label("Adapter or checkpoint")).to_have_value(adapter.name)
    page.get_by_label("File", exact=True).select_option(file.id)
    page.get_by_role("button", name="Start the evaluation").click()
    expect(page.locator("#ft-eval-status")).to_have_text("Queued")
    expect(page.locator("#ft-eval-rows")).to_have_text("waiting for a worker…")
    evaluation = Evaluation.all_tenants.get()

    Evaluation.all_tenants.filter(pk=evaluation.pk).update(status="running", rows_total=10, rows_done=4)
    expect(page.locator("#ft-eval-rows")).to_have_text("4 of 10 rows done")
    expect(page.locator("#ft-eval-status")).to_have_text("Running")
    expect(page.locator("#ft-eval-bar")).to_have_js_property("value", 40)

    for i in range(10):
        EvaluationRow.all_tenants.create(tenant=world.tenant, evaluation=evaluation, index=i, line=i + 1,
                                         prompt=rows[i]["messages"][:-1], expected="ZEBRA-42 approved",
                                         base_answer="I am not sure." if i % 2 else "ZEBRA-42 approved",
                                         adapter_answer="ZEBRA-42 approved", base_exact=not i % 2, adapter_exact=True,
                                         base_contains=not i % 2, adapter_contains=True, base_loss=8.0,
                                         adapter_loss=0.2, answer_tokens=5)
    Evaluation.all_tenants.filter(pk=evaluation.pk).update(
        status="succeeded", rows_done=10,
        metrics={"base": {"rows": 10, "exact_match": 0.5, "contains": 0.5, "loss": 8.0},
                 "adapter": {"rows": 10, "exact_match": 1.0, "contains": 1.0, "loss": 0.2}, "differing_rows": 5})
    # The page reloads itself with the results.
    table = page.locator("#ft-eval-table")
    expect(table.get_by_role("row", name="Exact match")).to_contain_text("50 %")
    expect(table.get_by_role("row", name="Exact match")).to_contain_text("100 %")
    expect(page.get_by_role("heading", name="Rows where the answers differ (5 of 10)")).to_be_visible()
    expect(page.locator("#ft-eval-rows-table tbody tr")).to_have_count(5)
    expect(page.locator("#ft-eval-rows-table")).to_contain_text("Is request 1 approved?")
    expect(page.get_by_role("img", name="Rows answered as expected")).to_be_visible()
    page.get_by_text("Table view").click()
    expect(page.get_by_role("row", name="Exact match · adapter")).to_contain_text("100 %")
