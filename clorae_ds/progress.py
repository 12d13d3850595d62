"""A progress line on stderr shared by training and evaluation."""
from __future__ import annotations

import sys


class Progress:
    """Rank 0's progress line on stderr: redrawn in place on a terminal (and wiped before each JSON log line,
    so those stay whole lines of their own), one plain line per update otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.shown = stream, False

    def show(self, text: str) -> None:
        if self.stream.isatty():
            self.stream.write(f"\r{text}\x1b[K")
            self.shown = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


PROGRESS = Progress()
