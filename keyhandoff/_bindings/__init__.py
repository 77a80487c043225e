"""Private compiled cffi modules.  Only one wrapper module per library imports each."""
