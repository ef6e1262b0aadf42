"""The fine-tuning job page follows a job by polling: what a person sees while it starts and once it ends."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.models import FineTuneJob, TrainingFile
from serving.models import BaseModel
from tests.support.browser import sign_in

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="browser tests need Debian's Chromium at /usr/bin/chromium"),
]

expect = pytest.importorskip("playwright.sync_api", reason="needs the 'playwright' package").expect


def test_running_job_says_what_it_waits_for_then_offers_deploy_and_drops_cancel(page, world):
    base = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat", context_length=1024)
    file = TrainingFile.all_tenants.create(tenant=world.tenant, filename="z.jsonl", bytes=10, path="x.jsonl",
                                           status=TrainingFile.Status.PROCESSED)
    job = FineTuneJob.all_tenants.create(tenant=world.tenant, base_model=base, training_file=file, status=FineTuneJob.Status.RUNNING,
                                         hyperparameters={"n_epochs": 3, "batch_size": 8}, lora={"rank": 16})
    sign_in(page, world.owner.email)
    page.goto(f"/t/acme/finetune/jobs/{job.id}/")
    expect(page.locator("#ft-steps")).to_have_text("starting: loading the base model…")
    cancel = page.get_by_role("button", name="Cancel job")
    expect(cancel).to_be_visible()
    expect(page.locator("#ft-next")).to_be_hidden()

    FineTuneJob.all_tenants.filter(pk=job.pk).update(status=FineTuneJob.Status.SUCCEEDED, step=21, total_steps=21, trained_tokens=7617,
                                                    fine_tuned_model="ft:tiny-chat:acme:z:1")
    expect(page.locator("#ft-status")).to_have_text("Succeeded")  # the label, as on the jobs list, not the raw status
    expect(cancel).to_be_hidden()  # `hidden` must win over .btn's display
    expect(page.locator("#ft-next")).to_be_visible()
    expect(page.locator("#ft-next").get_by_role("link", name="Adapters")).to_have_attribute("href", "/t/acme/finetune/adapters/")
