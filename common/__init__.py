"""What every app shares and that knows no app: charts and text for people. A leaf: it imports no app of the
platform (import-linter contract in pyproject.toml), so any app may import it."""
