"""What a person watching the console needs: one banner line per stage, rough durations, output in
order. No MLflow, no math."""
from __future__ import annotations

import sys


def line_buffered() -> None:
    """Flush stdout at every line, also when it is a file or a pipe (as stderr, where the bars go),
    so psydef's lines and the progress bars appear in the order they happened."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)


def banner(text: str) -> None:
    print(f"== {text}", flush=True)
