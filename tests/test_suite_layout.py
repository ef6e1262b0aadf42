"""The suite's own rules (README, "Tests"): test modules share helpers through tests/support/, never by importing
another test module or a conftest; conftests hold fixtures and hooks only (no helpers, no names imported for others);
each pytest-xdist worker gets a Redis database of its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.workers import redis_url_for_worker

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file, relative ones resolved (`from . import conftest` in
    tests/billing/ is tests.billing.conftest)."""
    package = list(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if node.module:
                found.append((node.lineno, module))
            else:
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def test_no_module_of_the_suite_imports_a_test_module_or_a_conftest():
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for line, module in imported_modules(path):
            last = module.rsplit(".", 1)[-1]
            if last == "conftest" or (module.startswith("tests.") and last.startswith("test_")):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not offenders, "move what they share into tests/support/:\n" + "\n".join(offenders)


def _is_fixture(node: ast.AST) -> bool:
    decorators = getattr(node, "decorator_list", [])
    for decorator in decorators:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if (isinstance(target, ast.Attribute) and target.attr == "fixture") or (isinstance(target, ast.Name) and target.id == "fixture"):
            return True
    return False


def _defines_fixture(module: str, name: str, root: Path) -> bool:
    """Whether `module` (one of the repository's) defines the fixture `name` at its top level."""
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    if not path.is_file():
        return False
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name and _is_fixture(node)
               for node in ast.parse(path.read_text(), filename=str(path)).body)


def conftest_problems(path: Path, root: Path = ROOT) -> list[str]:
    """What a conftest holds besides fixtures and hooks: a name it imports and does not use (kept for other modules:
    a re-export; a fixture imported to provide it is fine), a public function or class that is neither a fixture nor
    a pytest_ hook (a helper: tests/support/ is its place), a public constant it does not use itself."""
    tree = ast.parse(path.read_text(), filename=str(path))
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    where = path.relative_to(root)
    problems = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            module = ".".join(list(where.with_suffix("").parts[: -node.level]) + [node.module or ""]) if node.level else node.module
            for alias in node.names:
                name = alias.asname or alias.name
                if name not in used and not _defines_fixture(module.rstrip("."), alias.name, root):
                    problems.append(f"{where}:{node.lineno} imports {name} from {module} without using it (a re-export)")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.asname or alias.name.split(".")[0]
                if name not in used:
                    problems.append(f"{where}:{node.lineno} imports {alias.name} without using it (a re-export)")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if not (node.name.startswith(("_", "pytest_")) or _is_fixture(node)):
                problems.append(f"{where}:{node.lineno} defines {node.name}, neither a fixture nor a hook (a helper)")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for name in (n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)):
                if not name.startswith("_") and name not in used:
                    problems.append(f"{where}:{node.lineno} defines {name} without using it (for other modules)")
    return problems


def test_conftests_hold_fixtures_and_hooks_only():
    problems = [problem for path in sorted(TESTS.rglob("conftest.py")) for problem in conftest_problems(path)]
    assert not problems, ("move helpers into tests/support/ and import them from there in the modules using them:\n"
                          + "\n".join(problems))


def test_the_conftest_rule_finds_re_exports_helpers_and_imports_of_a_conftest(tmp_path):
    (tmp_path / "tests" / "support").mkdir(parents=True)
    (tmp_path / "tests" / "support" / "things.py").write_text(
        "import pytest\nTOKEN = 'x'\ndef helper(): ...\n@pytest.fixture\ndef thing(): return 1\n")
    conftest = tmp_path / "tests" / "conftest.py"
    conftest.write_text(
        "from __future__ import annotations\nimport os\nimport pytest\n"
        "from tests.support.things import TOKEN, helper, thing  # thing: a fixture, provided here\n"
        "from .support.things import helper as again\n"
        "LIMIT = 3\n_PRIVATE = 4\nUSED = 5\n"
        "class World: ...\ndef make(): ...\ndef _internal(): return USED\n"
        "def pytest_configure(config): os.environ.get('X')\n"
        "@pytest.fixture\ndef world(): return helper()\n")
    assert conftest_problems(conftest, root=tmp_path) == [
        "tests/conftest.py:4 imports TOKEN from tests.support.things without using it (a re-export)",
        "tests/conftest.py:5 imports again from tests.support.things without using it (a re-export)",
        "tests/conftest.py:6 defines LIMIT without using it (for other modules)",
        "tests/conftest.py:9 defines World, neither a fixture nor a hook (a helper)",
        "tests/conftest.py:10 defines make, neither a fixture nor a hook (a helper)",
    ]
    test_module = tmp_path / "tests" / "billing" / "test_x.py"
    test_module.parent.mkdir()
    test_module.write_text("from . import conftest\nfrom ..conftest import world\nimport conftest\nfrom tests.test_y import z\n")
    assert imported_modules(test_module, root=tmp_path) == [
        (1, "tests.billing.conftest"), (2, "tests.conftest"), (3, "conftest"), (4, "tests.test_y")]


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
