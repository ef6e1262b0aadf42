"""What the tests share: helpers, fakes and fixtures, no tests. Test modules import from here (or get fixtures from a
conftest), never from another test module or a conftest; tests/test_suite_layout.py checks it."""
