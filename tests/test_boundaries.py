"""The never-rules of docs/architecture.md ("Boundaries") hold: the import-linter contracts in pyproject.toml
(common is a leaf, no app imports portal, apps are layers, the gateway imports no torch, no import circles) are
checked on every run of the suite. `lint-imports` prints the same report with the chain that broke a rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " 0 broken" in out.stdout
