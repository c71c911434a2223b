"""Render docs/src/*.md into docs/: each {{path::Symbol}} or {{path::Class.method}} becomes a link
to the file that defines it, named by the symbol (checked to be defined there). Links carry no
line numbers, so an edit above a definition leaves docs/ as it was; moving or renaming a
definition makes rendering (and tests/test_docs.py) fail until docs/src names its new place."""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\{\{([^:}]+)::([^}]+)\}\}")


def definition_line(path: str, symbol: str) -> int:
    """The 1-based line where `symbol` (a top-level name or Class.method) is defined in `path`."""
    lines = (REPO / path).read_text().splitlines()
    parts = symbol.split(".")
    owner = None
    for i, line in enumerate(lines, 1):
        s = line.strip()
        if len(parts) == 2:
            if line.startswith("class "):
                owner = re.match(r"class (\w+)", line).group(1)
            if owner == parts[0] and re.match(rf"(async )?def {re.escape(parts[1])}\(", s):
                return i
        elif re.match(rf"(def|class) {re.escape(parts[0])}\b", line):
            return i
    raise SystemExit(f"{symbol} is not defined in {path}")


def render(text: str) -> str:
    def link(m: re.Match) -> str:
        definition_line(m.group(1), m.group(2))  # fails when the file does not define the symbol
        return f"[`{m.group(2)}`](../{m.group(1)})"

    return LINK.sub(link, text)


def main() -> None:
    for src in sorted((REPO / "docs" / "src").glob("*.md")):
        out = REPO / "docs" / src.name
        rendered = render(src.read_text())
        if not out.exists() or out.read_text() != rendered:
            out.write_text(rendered)
            print(f"wrote {out.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
