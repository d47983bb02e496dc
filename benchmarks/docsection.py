"""Keep generated benchmark results in a hand-written document: each script owns one marked section."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, mark: str, text: str) -> None:
    """Replace the text between this mark's begin/end comments in ``path`` (appended if absent), keeping the rest."""
    begin, end = f"<!-- BEGIN GENERATED: {mark} -->", f"<!-- END GENERATED: {mark} -->"
    block = f"{begin}\n{text}\n{end}"
    current = path.read_text() if path.exists() else "# Performance\n"
    if begin in current and end in current:
        before, rest = current.split(begin, 1)
        after = rest.split(end, 1)[1]
        current = before + block + after
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(current)
