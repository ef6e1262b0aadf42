"""The fine-tuning file page follows a validation by polling: the bar moves, then the report replaces it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.utils import timezone

from finetune import services
from finetune.models import TrainingFile
from tests.support.browser import sign_in

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="browser tests need Debian's Chromium at /usr/bin/chromium"),
]

expect = pytest.importorskip("playwright.sync_api", reason="needs the 'playwright' package").expect


def test_a_validating_file_shows_its_progress_then_its_report(page, world, settings, tmp_path):
    settings.STORAGE_DIR = tmp_path / "storage"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(12)]
    data = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
    relative = f"tenants/{world.tenant.pk}/files/file-browser.jsonl"
    (settings.STORAGE_DIR / relative).parent.mkdir(parents=True)
    (settings.STORAGE_DIR / relative).write_bytes(data)
    file = TrainingFile.all_tenants.create(id="file-browser", tenant=world.tenant, filename="z.jsonl", bytes=len(data),
                                           path=relative, validation_queued_at=timezone.now())  # sent to a worker, not taken yet
    sign_in(page, world.owner.email)
    page.goto(f"/t/acme/finetune/files/{file.id}/")
    expect(page.locator("#ft-file-progress")).to_have_text("Waiting for a worker to validate it")
    expect(page.get_by_role("link", name="Train on this file")).to_have_count(0)

    TrainingFile.all_tenants.filter(pk=file.pk).update(lines_validated=6, bytes_validated=len(data) // 2)
    expect(page.locator("#ft-file-progress")).to_have_text(f"50 % validated: 6 lines, {len(data) // 2:,} of {len(data):,} bytes")
    expect(page.locator("#ft-file-bar")).to_have_attribute("value", "50")

    assert services.training_file_validate(file_id=file.id, tenant_id=world.tenant.pk) == "processed"  # the worker
    expect(page.get_by_role("heading", name="Statistics")).to_be_visible()  # the page reloaded with the report
    expect(page.locator("#ft-file-bar")).to_have_count(0)
    expect(page.get_by_role("link", name="Train on this file")).to_be_visible()
