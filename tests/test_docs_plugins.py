"""docs/plugins.md is run, not just read: its example plugin is extracted, installed as pip
would (module plus ``*.dist-info`` on ``PYTHONPATH``), and its console sessions, its own
tests and its helper snippets run against the code as it is.

Blocks of the example project start with a comment naming their path (``# pyproject.toml``);
other Python blocks are snippets run as they are; console blocks are ``$ command`` lines
followed by the exact output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

# Runs the real `checkstream` program (or its process pools) as a user would: the e2e tier.
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "plugins.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# Console sessions that need a running gateway and a backend; the same behaviour is tested
# end to end in tests/test_plugins.py.
NEEDS_A_GATEWAY = ("curl ",)


@dataclass(frozen=True)
class Block:
    language: str
    text: str


@dataclass(frozen=True)
class Session:
    command: str
    output: str


def blocks() -> list[Block]:
    return [Block(m.group(1), m.group(2)) for m in FENCE.finditer(DOC.read_text())]


def project_files() -> dict[str, str]:
    """The example project's files, by the path named in each block's first line."""
    files = {}
    for block in blocks():
        first = block.text.split("\n", 1)[0]
        if block.language in {"toml", "python", "yaml"} and re.fullmatch(r"# [\w./-]+", first):
            files[first[2:]] = block.text
    return files


def snippets() -> list[str]:
    return [
        b.text
        for b in blocks()
        if b.language == "python" and b.text.split("\n", 1)[0] not in {f"# {p}" for p in FILES}
    ]


def sessions() -> list[Session]:
    found = []
    for block in blocks():
        if block.language != "console":
            continue
        command: list[str] = []
        output: list[str] = []
        continuing = False
        for line in block.text.splitlines():
            if continuing:
                command.append(line)
                continuing = line.endswith("\\")
            elif line.startswith("$ "):
                if command:
                    found.append(Session("\n".join(command), "".join(output)))
                command, output = [line[2:]], []
                continuing = line.endswith("\\")
            else:
                output.append(line + "\n")
        if command:
            found.append(Session("\n".join(command), "".join(output)))
    return [s for s in found if not s.command.startswith(NEEDS_A_GATEWAY)]


FILES = project_files()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkstream-shouting")
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def site(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project installed as pip would: its package plus a dist-info from pyproject.toml."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    site = tmp_path_factory.mktemp("site")
    for package in (project / "src").iterdir():
        shutil.copytree(package, site / package.name)
    info = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
    )
    table = "".join(f"{k} = {v}\n" for k, v in meta["entry-points"]["checkstream"].items())
    (info / "entry_points.txt").write_text(f"[checkstream]\n{table}")
    return site


def environment(*paths: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(p) for p in (*paths, REPO)),
        # `checkstream` in a console session is this interpreter's.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }


def test_the_page_holds_the_whole_example_project() -> None:
    assert set(FILES) == {
        "pyproject.toml",
        "src/checkstream_shouting/__init__.py",
        "tests/test_shouting.py",
        "checkstream.yaml",
        "policies/acme.yaml",
    }
    commands = [s.command.split("|")[-1].split()[:2] for s in sessions()]
    assert commands == [
        ["checkstream", "plugins"],
        ["checkstream", "classifiers"],
        ["checkstream", "config"],
        ["checkstream", "policy"],
    ]
    assert len(snippets()) == 3  # the import line, MicroBatcher, normalize


@pytest.mark.parametrize("index", range(len(sessions())))
def test_console_session_prints_what_the_page_says(project: Path, site: Path, index: int) -> None:
    session = sessions()[index]
    done = subprocess.run(
        ["bash", "-c", session.command],
        capture_output=True,
        text=True,
        cwd=project,
        env=environment(site),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == session.output


def test_the_example_plugins_own_tests_pass(project: Path) -> None:
    # Not installed: the page says pytest finds the module through pythonpath = ["src"].
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_shouting.py"],
        capture_output=True,
        text=True,
        cwd=project,
        env=environment(),
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


@pytest.mark.parametrize("index", range(len(snippets())))
def test_snippet_runs(index: int) -> None:
    # The snippets' asserts are their checks; each gets a namespace of its own.
    code = compile(snippets()[index], f"{DOC}:snippet {index}", "exec")
    exec(code, {"__name__": f"plugins_md_snippet_{index}"})
