"""Where fine-tuning keeps its files: STORAGE_DIR, a tenant's folder, a job's output, a training file's bytes."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from django.conf import settings

from finetune.models import FineTuneJob, TrainingFile


def storage_root() -> Path:
    return Path(settings.STORAGE_DIR)


def tenant_storage_dir(tenant_id: int) -> Path:
    """Every file of a tenant lives under STORAGE_DIR/tenants/<tenant id>/."""
    return storage_root() / "tenants" / str(int(tenant_id))


def job_output_dir(job: FineTuneJob) -> Path:
    return tenant_storage_dir(job.tenant_id) / "jobs" / job.id


def training_file_open(file: TrainingFile) -> BinaryIO:
    """The stored bytes as a binary stream (validation and the trainer read it line by line, the download in blocks)."""
    return open(storage_root() / file.path, "rb")


def training_file_lines(file: TrainingFile, wanted: set[int], *, max_chars: int = 300) -> dict[int, str]:
    """The first `max_chars` characters of the lines numbered in `wanted` (1-based), read up to the last of them
    without holding more than one line's head: a long line is skipped through, not loaded."""
    found: dict[int, str] = {}
    last = max(wanted, default=0)
    with training_file_open(file) as stream:
        for n in range(1, last + 1):
            head = stream.readline(4 * max_chars)  # UTF-8: at most 4 bytes a character
            if not head:
                break
            if n in wanted:
                found[n] = head.rstrip(b"\r\n").decode("utf-8", "replace")[:max_chars]
            while not head.endswith(b"\n") and (head := stream.readline(64 * 1024)):
                pass
    return found
