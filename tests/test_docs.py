"""The README and docs/: short README, every relative link resolves (file and anchor), generated blocks current."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 350

# [text](target) and ![alt](target); the target ends at whitespace or ")" (titles after a space are ignored).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (links there are examples, not links)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link keeps its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file defines: its headings (GitHub's slugs, -1, -2 for repeats)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not match:
            continue
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def relative_links(path: Path) -> list[str]:
    targets = LINK.findall(_prose(path.read_text(encoding="utf-8")))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, flags=re.I)]  # no http:, mailto:, ...


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_docs_folder_has_the_promised_pages() -> None:
    names = {p.name for p in DOCS}
    for name in ("recipe-reference.md", "python-api.md", "deployment.md", "sparseml.md", "research.md"):
        assert name in names, f"docs/{name} is missing"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    links = relative_links(page)
    for target in links:
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(file_part)).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: " + "; ".join(broken)


def test_readme_links_into_every_docs_page() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    orphans = [p.name for p in DOCS if p.resolve() not in linked]
    assert not orphans, f"docs pages the README never links to: {orphans}"


def test_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A heading, `with` code\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a-heading-with-code) [ok](there.md#twice-1) ![img](there.md)\n"
                    "`[not a link](nowhere.md)` [web](https://example.com/x)\n```\n[code](nowhere.md)\n```\n")
    assert relative_links(page) == ["there.md#a-heading-with-code", "there.md#twice-1", "there.md"]
    assert anchors(tmp_path / "there.md") == {"a-heading-with-code", "twice", "twice-1"}


def test_recipe_reference_matches_the_schema() -> None:
    """docs/recipe-reference.md is generated from the schema; regenerate with `scripts/recipe_reference.py --write`."""
    code = ("import sys; sys.path.insert(0, 'scripts'); import recipe_reference as r; "
            "print(r.documented_table() == r.table())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "True", (
        "docs/recipe-reference.md no longer matches the recipe schema: run "
        "`.venv/bin/python scripts/recipe_reference.py --write`")


@pytest.mark.parametrize("page, begin, end", [
    ("README.md", "<!-- architecture:begin -->", "<!-- architecture:end -->"),
    ("README.md", "<!-- structured-benchmark:begin -->", "<!-- structured-benchmark:end -->"),
    ("README.md", "<!-- deploy:begin -->", "<!-- deploy:end -->"),
    ("README.md", "<!-- research-summary:begin -->", "<!-- research-summary:end -->"),
    ("docs/research.md", "<!-- results:begin -->", "<!-- results:end -->"),
    ("docs/recipe-reference.md", "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"),
])
def test_generated_blocks_keep_their_markers(page: str, begin: str, end: str) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    assert text.count(begin) == 1 and text.count(end) == 1 and text.index(begin) < text.index(end), \
        f"{page} must hold one {begin} ... {end} block (its generator writes there)"
