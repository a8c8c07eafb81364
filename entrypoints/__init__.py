"""Thin click commands, one per MLproject entry point; `psydef` groups them (entrypoints.cli)."""
