"""Integration tests against real parts (a package, so test modules cannot import one another
by bare name; shared helpers are in tests/support)."""
