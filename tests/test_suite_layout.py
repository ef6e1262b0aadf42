"""The suite's own rules (README, "Tests"): test modules share helpers through tests/support/, never by importing
another test module or a conftest; each pytest-xdist worker gets a Redis database of its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.workers import redis_url_for_worker

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def test_no_module_of_the_suite_imports_a_test_module_or_a_conftest():
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for line, module in imported_modules(path):
            last = module.rsplit(".", 1)[-1]
            if module.startswith("tests.") and (last.startswith("test_") or last == "conftest"):
                offenders.append(f"{path.relative_to(TESTS.parent)}:{line} imports {module}")
    assert not offenders, "move what they share into tests/support/:\n" + "\n".join(offenders)


@pytest.mark.parametrize(("url", "worker", "expected"), [
    ("redis://127.0.0.1:6379/15", 0, "redis://127.0.0.1:6379/15"),
    ("redis://127.0.0.1:6379/15", 1, "redis://127.0.0.1:6379/14"),
    ("redis://127.0.0.1:6379/0", 1, "redis://127.0.0.1:6379/1"),
    ("redis://127.0.0.1:6379", 2, "redis://127.0.0.1:6379/2"),
    ("redis://:secret@cache.internal:6380/3", 2, "redis://:secret@cache.internal:6380/1"),
    ("unix:///run/redis.sock?db=4", 1, "unix:///run/redis.sock?db=3"),
])
def test_each_xdist_worker_gets_a_redis_database_of_its_own(url, worker, expected):
    assert redis_url_for_worker(url, worker) == expected


def test_too_many_workers_for_the_databases_left_is_said_plainly():
    with pytest.raises(ValueError, match="no database of its own for xdist worker gw9"):
        redis_url_for_worker("redis://127.0.0.1:6379/8", 9)
