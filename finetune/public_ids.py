"""Opaque public ids for rows whose primary key is a global sequence: job events and checkpoints.

`ftevent-<pk>` would tell every tenant how many events all tenants have made. Instead the public id is the
primary key through a keyed permutation of 64-bit numbers, written as 16 hex digits (`ftevent-3f09c2…`): an
8-round Feistel network whose round function is HMAC-SHA256 under a key derived from SECRET_KEY and the prefix.
Without the key the ids show no order or count; with it they decode to the primary key, so `after` pagination
still compares primary keys and nothing is stored (no column, no migration). Job and file ids need none of this:
they are random (`finetune.models.new_job_id`).

Rotating SECRET_KEY changes these ids; a client's `after` cursor from before then answers 400 (list again).
"""

from __future__ import annotations

import hashlib
import hmac
import re

from django.conf import settings
from django.utils.crypto import salted_hmac

_ROUNDS = 8
_MASK32 = 0xFFFF_FFFF
_MAX_PK = 2**63 - 1  # BigAutoField
_HEX16 = re.compile(r"[0-9a-f]{16}")


def encode(prefix: str, pk: int) -> str:
    """`{prefix}-{16 hex digits}` for a primary key (1 … 2**63 − 1)."""
    if not 0 < pk <= _MAX_PK:
        raise ValueError(f"primary key out of range: {pk}")
    key = _key(prefix)
    left, right = pk >> 32, pk & _MASK32
    for n in range(_ROUNDS):
        left, right = right, left ^ _round(key, n, right)
    return f"{prefix}-{(left << 32) | right:016x}"


def decode(prefix: str, public_id: str) -> int | None:
    """The primary key behind a public id of this prefix, or None if it is not one (wrong prefix or shape, or a
    number no row can have). A forged id decodes to an arbitrary number: callers still look the row up, scoped."""
    digits = public_id.removeprefix(f"{prefix}-")
    if digits == public_id or not _HEX16.fullmatch(digits):
        return None
    key = _key(prefix)
    value = int(digits, 16)
    left, right = value >> 32, value & _MASK32
    for n in reversed(range(_ROUNDS)):
        left, right = right ^ _round(key, n, left), left
    pk = (left << 32) | right
    return pk if 0 < pk <= _MAX_PK else None


def _key(prefix: str) -> bytes:
    return salted_hmac("finetune.public_ids", prefix, secret=settings.SECRET_KEY, algorithm="sha256").digest()


def _round(key: bytes, n: int, half: int) -> int:
    digest = hmac.new(key, bytes([n]) + half.to_bytes(4, "big"), hashlib.sha256).digest()
    return int.from_bytes(digest[:4], "big")
