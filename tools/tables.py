"""Result tables of the benchmark tools: markdown rows and the JSON beside them.

``ptq bench``, ``tools.bench_remote``, ``tools.bench_kernels`` and ``tools.rpc_timing`` all
print a markdown table of what they measured and keep the same rows as JSON; this is that code
once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence


def error_line(e: BaseException) -> str:
    """``Type: message`` on one line (whitespace collapsed, at most 300 characters): a failed
    row's reason."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]],
                   right: Iterable[str] = ()) -> list[str]:
    """The lines of a markdown table; the columns named in ``right`` are right-aligned
    (numbers). Every row must have one cell per column."""
    right = set(right)
    unknown = right - set(header)
    if unknown:
        raise ValueError(f"markdown_table: right-aligned columns {sorted(unknown)} are not in "
                         f"the header {list(header)}")
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if h in right else "---" for h in header) + "|"]
    for row in rows:
        row = list(row)
        if len(row) != len(header):
            raise ValueError(f"markdown_table: row {row} has {len(row)} cells for "
                             f"{len(header)} columns")
        lines.append("| " + " | ".join("" if c is None else str(c) for c in row) + " |")
    return lines


def write_json(path: Optional[str | Path], data) -> None:
    """``data`` as indented JSON at ``path`` (nothing when ``path`` is None)."""
    if path is not None:
        Path(path).write_text(json.dumps(data, indent=1))
