"""One small module per source format; each yields Records, or the RecordError of a sample it cannot read
(naming file:line), and lets load_raw decide whether to stop or skip."""
from __future__ import annotations

from typing import Iterator


def numbered_lines(path: str) -> Iterator[tuple[int, str, str]]:
    """(line number, "path:line", line) for every non-blank line of a line-per-sample file."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, f"{path}:{number}", line
