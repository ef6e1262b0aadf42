"""The one error type of fine-tuning that a tenant can fix (a leaf module: services and the modules it calls raise it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FinetuneError(Exception):
    """A problem the caller can fix. status: HTTP status; code: stable snake_case; param: the field at fault."""

    message: str
    status: int = 400
    code: str = "invalid_request"
    param: str | None = None

    def __str__(self) -> str:
        return self.message
