"""The command line's one way to speak: a line on stderr, prefixed with the program's name."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """One line on stderr: ``lightning-saliency: <message>``."""
    print(f"lightning-saliency: {message}", file=sys.stderr, flush=True)
