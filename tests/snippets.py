"""The fenced code blocks of README.md and docs/, as tests run them.

Every fenced block in a checked file is preceded by one marker line:

- `<!-- snippet: NAME -->`: a test extracts it with `snippet(FILE, NAME)` and runs it;
- `<!-- not run: REASON -->`: it is not run, and REASON says why.

`tests/test_snippets.py` holds every block to this (and every NAME to a test that uses it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKED_FILES = (
    "README.md",
    "deployments/README.md",
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")),
)
# a fence may be indented (inside a list item); its closing fence has the same indentation
_FENCE = re.compile(r"^([ \t]*)(```+)([\w+-]*)[^\n]*\n(.*?)^\1\2[ \t]*$", re.S | re.M)
FENCE_LINE = re.compile(r"^[ \t]*(```|~~~)", re.M)  # any line that opens or closes a fence
_MARKER = re.compile(r"<!--\s*(snippet|not run):\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    file: str
    line: int  # of the opening fence, 1-based
    language: str
    text: str  # the block's content, without the fences and the last newline
    kind: str | None  # "snippet", "not run", or None when unmarked
    label: str  # the snippet's NAME or the reason it is not run


def blocks(file: str, content: str | None = None) -> list[Block]:
    """Every fenced block of `file` (relative to the repository; or of its `content` when
    given), with its marker."""
    if content is None:
        content = (REPO / file).read_text()
    found = []
    for match in _FENCE.finditer(content):
        indent, language, body = match.group(1), match.group(3), match.group(4)
        line = content.count("\n", 0, match.start()) + 1
        before = content[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        text = "".join(row.removeprefix(indent) for row in body.splitlines(keepends=True))
        found.append(
            Block(
                file=file,
                line=line,
                language=language,
                text=text.removesuffix("\n"),
                kind=marker.group(1) if marker else None,
                label=marker.group(2) if marker else "",
            )
        )
    return found


def snippet(file: str, name: str) -> str:
    """The text of the block marked `<!-- snippet: name -->` in `file`."""
    matches = [b for b in blocks(file) if b.kind == "snippet" and b.label == name]
    if len(matches) != 1:
        raise LookupError(f"{file}: {len(matches)} blocks marked <!-- snippet: {name} -->")
    return matches[0].text
