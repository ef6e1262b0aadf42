"""The management API's pagination: DRF's limit/offset, bounded so no query string reaches the database unchecked."""

from __future__ import annotations

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination

MAX_LIMIT = 500
MAX_OFFSET = 2**31 - 1  # past any table here; larger values overflowed the database's integer (a 500)


class BoundedLimitOffsetPagination(LimitOffsetPagination):
    """`limit` is 1–500 (larger values are lowered to 500, as DRF's max_limit does); `offset` an integer
    0–2³¹−1. A value that is not such an integer is a 400 naming the parameter (DRF silently used the default)."""

    max_limit = MAX_LIMIT

    def _bounded(self, request, name: str, lo: int, hi: int | None) -> int | None:
        raw = request.query_params.get(name)
        if raw is None or raw == "":
            return None
        try:
            value = int(raw)
        except ValueError:
            raise ValidationError({name: [f"`{name}` must be an integer; got {raw[:40]!r}."]}) from None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi:,}" if hi is not None else f"at least {lo}"
            raise ValidationError({name: [f"`{name}` must be {bound}; got {raw[:40]}."]})
        return value

    def get_limit(self, request):
        value = self._bounded(request, self.limit_query_param, 1, None)
        return self.default_limit if value is None else min(value, self.max_limit)

    def get_offset(self, request):
        value = self._bounded(request, self.offset_query_param, 0, MAX_OFFSET)
        return 0 if value is None else value
