"""Test doubles shipped with the package (for tests and demos; never production defaults)."""
