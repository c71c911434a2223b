"""Render docs/src/*.md into docs/: each {{path::Symbol}} or {{path::Class.method}} becomes a link
to the line that defines it, so the links follow the code. Run `make docs` after moving code;
tests/test_docs.py fails while docs/ is stale."""
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
    return LINK.sub(lambda m: f"[`{m.group(2)}`](../{m.group(1)}#L{definition_line(m.group(1), m.group(2))})", text)


def main() -> None:
    for src in sorted((REPO / "docs" / "src").glob("*.md")):
        out = REPO / "docs" / src.name
        rendered = render(src.read_text())
        if not out.exists() or out.read_text() != rendered:
            out.write_text(rendered)
            print(f"wrote {out.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
