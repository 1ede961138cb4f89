"""Moved to tests/helpers.py (kept until every module imports from there)."""

from tests.helpers import needs_cpp_compiler, needs_cuda  # noqa: F401
