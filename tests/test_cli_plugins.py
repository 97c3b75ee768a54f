"""``checkstream plugins`` as a user runs it: a real process, with a third-party plugin
installed the way pip leaves one (a module plus its ``*.dist-info``) on ``PYTHONPATH``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from tests.test_plugins import BROKEN_PLUGIN, SHOUTING_PLUGIN, install

# Runs the real `checkstream` program as a user would: the e2e tier.
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent

BUILT_IN_TYPES = {
    "keyword": "keyword",
    "pii_detector": "pii",
    "prompt_injection": "prompt_injection",
    "remote": "remote",
    "topic": "topic",
    "toxicity": "toxicity",
}

# A plugin that only releases something at shutdown: listed although it offers no type.
SHUTDOWN_ONLY_PLUGIN = """\
from checkstream import hookimpl



@hookimpl
def checkstream_shutdown():
    return None
"""


def checkstream(*args: str, site: Path | None = None) -> subprocess.CompletedProcess[str]:
    path = [str(site)] if site is not None else []
    return subprocess.run(
        [sys.executable, "-m", "checkstream", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(REPO)])},
        timeout=120,
    )


def third_party_site(tmp_path: Path) -> Path:
    site = install(
        tmp_path / "site",
        "cs_shouting",
        {"cs_shouting": SHOUTING_PLUGIN, "cs_closing": SHUTDOWN_ONLY_PLUGIN},
        {"shouting": "cs_shouting", "closing": "cs_closing"},
    )
    # A version of its own, so the row cannot be showing CheckStream's.
    (site / "cs_shouting-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: cs_shouting\nVersion: 2.7.1\n"
    )
    return site


def rows(stdout: str) -> list[dict[str, Any]]:
    found = json.loads(stdout)
    assert isinstance(found, list)
    return found


def test_built_ins_are_listed_with_the_checkstream_distribution() -> None:
    done = checkstream("plugins", "--format", "json")
    assert done.returncode == 0, done.stderr
    listed = {row["type"]: row for row in rows(done.stdout)}
    assert set(BUILT_IN_TYPES) <= set(listed)
    ours = version("checkstream")
    for type_name, plugin in BUILT_IN_TYPES.items():
        row = listed[type_name]
        assert (row["plugin"], row["distribution"], row["version"]) == (
            plugin,
            "checkstream",
            ours,
        )
        assert "checkstream_classifier_types" in row["hooks"]
    # remote keeps gRPC channels open, so it is the built-in that closes something.
    assert listed["remote"]["hooks"] == ["checkstream_classifier_types", "checkstream_shutdown"]
    assert listed["keyword"]["hooks"] == ["checkstream_classifier_types"]


def test_third_party_plugin_shows_its_own_distribution_and_version(tmp_path: Path) -> None:
    done = checkstream("plugins", "--format", "json", site=third_party_site(tmp_path))
    assert done.returncode == 0, done.stderr
    listed = rows(done.stdout)
    by_type = {row["type"]: row for row in listed}
    assert by_type["shouting"] == {
        "type": "shouting",
        "plugin": "shouting",
        "distribution": "cs_shouting",
        "version": "2.7.1",
        "hooks": ["checkstream_classifier_types"],
    }
    assert by_type["keyword"]["distribution"] == "checkstream"
    # Offering no classifier type, it still loads into every worker: the last row.
    assert listed[-1] == {
        "type": None,
        "plugin": "closing",
        "distribution": "cs_shouting",
        "version": "2.7.1",
        "hooks": ["checkstream_shutdown"],
    }


def test_table_has_one_aligned_row_per_type(tmp_path: Path) -> None:
    done = checkstream("plugins", site=third_party_site(tmp_path))
    assert done.returncode == 0, done.stderr
    header, *body = done.stdout.splitlines()
    assert header.split() == ["TYPE", "PLUGIN", "DISTRIBUTION", "VERSION", "HOOKS"]
    # Columns line up: each field starts where its header does.
    starts = [header.index(name) for name in ("PLUGIN", "DISTRIBUTION", "VERSION", "HOOKS")]
    table = {line.split()[0]: line for line in body}
    shouting = table["shouting"]
    assert [shouting[s:].split()[0] for s in starts] == [
        "shouting",
        "cs_shouting",
        "2.7.1",
        "checkstream_classifier_types",
    ]
    assert table["remote"][starts[3] :] == "checkstream_classifier_types, checkstream_shutdown"
    assert table["-"].split() == ["-", "closing", "cs_shouting", "2.7.1", "checkstream_shutdown"]
    assert len(body) == len(BUILT_IN_TYPES) + 2


def test_a_plugin_that_fails_to_import_is_named_without_a_traceback(tmp_path: Path) -> None:
    site = install(
        tmp_path / "site", "cs_broken", {"cs_broken": BROKEN_PLUGIN}, {"broken": "cs_broken"}
    )
    done = checkstream("plugins", site=site)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        "checkstream: plugin 'broken' (cs_broken) failed to import: ModuleNotFoundError: "
        "No module named 'checkstream_test_module_that_does_not_exist'\n"
    )
