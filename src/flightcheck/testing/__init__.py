"""Helpers for pytest: run flightcheck's checks on every commit, count host-device syncs."""

from flightcheck.testing.syncs import SyncCounter

__all__ = ["SyncCounter"]
