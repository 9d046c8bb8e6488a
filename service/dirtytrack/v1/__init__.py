"""Generated from proto/dirtytrack/v1 at build time (proto/build_stubs.py)."""
