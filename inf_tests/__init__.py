"""Inference runtime tests: `python -m inf_tests.runtime` (see inf_tests/README.md)."""
