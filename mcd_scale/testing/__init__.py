"""Test-time instruments that ship with the package (used by tests/ and usable by anyone debugging a run)."""
