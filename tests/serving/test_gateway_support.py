"""Moved to tests/support/gateway.py: import from there (test modules do not import other test modules).

This re-export is kept only while work in flight still names the old module; tests/test_suite_layout.py fails for
any module that imports it."""

from tests.support.gateway import *  # noqa: F401,F403
from tests.support.gateway import _make_adapter  # noqa: F401
