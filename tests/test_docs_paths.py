"""The README and docs/ name files that exist: the Layout tree, and every ``extproc/`` or
``plugins/`` path in the prose (modules move; a newcomer follows these names first)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SOURCE_PATH = re.compile(r"(?<![\w.])(?:extproc|plugins)/[\w./-]*\w")
# A tree entry: its indentation gives its depth (two spaces a level); deeper lines
# continue the description above them.
ENTRY = re.compile(r"^( *)(\S+)")
CONTINUATION_INDENT = 12


def layout_paths() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Layout\n", 1)[1].split("```\n", 2)[1]
    parents: list[str] = []
    paths = []
    for line in block.splitlines():
        match = ENTRY.match(line)
        if match is None or len(match.group(1)) >= CONTINUATION_INDENT:
            continue
        depth = len(match.group(1)) // 2
        parents = parents[:depth]
        name = match.group(2)
        paths.append("".join(parents) + name)
        if name.endswith("/"):
            parents.append(name)
    return paths


def test_layout_lists_the_packages() -> None:
    paths = layout_paths()
    packages = {
        f"extproc/{p.name}/" for p in (REPO / "extproc").iterdir() if (p / "__init__.py").is_file()
    }
    assert packages <= set(paths), packages - set(paths)


@pytest.mark.parametrize("path", layout_paths())
def test_layout_entry_exists(path: str) -> None:
    assert (REPO / path).exists(), f"README Layout names {path}, which does not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_source_paths_in_prose_exist(page: Path) -> None:
    missing = sorted({p for p in SOURCE_PATH.findall(page.read_text()) if not (REPO / p).exists()})
    assert missing == []
