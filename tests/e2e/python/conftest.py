"""Fixtures live in e2e_support.py (tests import its helpers too)."""

from e2e_support import clients, http_url, realtime_url, sfx, sql  # noqa: F401
