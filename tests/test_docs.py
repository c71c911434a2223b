"""The documents point at code that exists: docs/ is the rendering of docs/src/ (every link
lands on the definition it names), and the README's make targets and files exist."""
import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _renderer():
    spec = importlib.util.spec_from_file_location("render", REPO / "docs" / "src" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_are_rendered_from_their_sources():
    render = _renderer()
    for src in (REPO / "docs" / "src").glob("*.md"):
        assert (REPO / "docs" / src.name).read_text() == render.render(src.read_text()), \
            f"docs/{src.name} is stale: run `make docs`"


def test_design_links_name_definitions_that_exist():
    text = (REPO / "docs" / "design.md").read_text()
    links = re.findall(r"\[`([\w.]+)`\]\(\.\./([\w/.]+\.py)\)", text)
    assert len(links) > 20
    for symbol, path in links:
        source = (REPO / path).read_text()
        parts = symbol.split(".")
        if len(parts) == 1:
            assert re.search(rf"^(def|class) {re.escape(symbol)}\b", source, re.M), (symbol, path)
        else:  # a method: defined in the body of its class
            lines = source[source.index(f"class {parts[0]}"):].splitlines()
            end = next((i for i, ln in enumerate(lines[1:], 1) if ln[:1].strip() and ln[0] != ")"), len(lines))
            body = "\n".join(lines[:end])
            assert re.search(rf"^\s+def {re.escape(parts[1])}\(", body, re.M), (symbol, path)


def test_readme_names_only_make_targets_and_files_that_exist():
    readme = (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    for target in set(re.findall(r"make ([a-z][a-z-]*)", readme)):
        assert re.search(rf"^{target}:", makefile, re.M), target
    for link in re.findall(r"\]\(((?:docs|data|bench)/[^)#]+|LICENSE)\)", readme):
        assert (REPO / link).exists(), link
    assert len(readme.encode()) < 12 * 1024


def test_no_placeholders_left_in_the_documents():
    """An UPPER_CASE_NAME in a document is a constant or environment variable the code uses, not a
    figure still to be filled in."""
    code = "\n".join(p.read_text() for p in [*REPO.glob("vglaw/**/*.py"), *REPO.glob("tests/**/*.py"),
                                             REPO / "Makefile", REPO / ".ci" / "run"])
    for path in [REPO / "README.md", REPO / "data" / "README.md", *(REPO / "docs").glob("*.md")]:
        names = set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", path.read_text()))
        assert not [n for n in names if n not in code], (path, sorted(n for n in names if n not in code))
