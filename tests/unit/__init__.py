"""Unit tests (a package, so test modules cannot import one another by bare name)."""
