"""Hostile and odd YAML (extproc/config/yamlsource.py): every problem is a located ConfigError, and
alias bombs, deep nesting and recursive aliases are refused without expanding them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from checkstream.config import yamlsource
from checkstream.config.model import load_config
from checkstream.config.yamlsource import MAX_ALIASES, MAX_DEPTH, ConfigError, load_yaml
from checkstream.ops.control import GatewayControl
from checkstream.policy.files import lint_policy_file, load_policy_file

GOOD = "server: {port: 8080}\ntenants:\n  configs:\n    a: {backend_url: 'http://127.0.0.1:9'}\n"


def _refused(tmp_path: Path, text: str, name: str = "c.yaml") -> ConfigError:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "Traceback" not in str(caught.value)
    assert str(caught.value).startswith(str(path))
    return caught.value


def _billion_laughs(levels: int = 9) -> str:
    names = "abcdefghijk"
    lines = ["a: &a [l,l,l,l,l,l,l,l,l]"]
    for i in range(1, levels + 1):
        refs = ",".join([f"*{names[i - 1]}"] * 9)
        lines.append(f"{names[i]}: &{names[i]} [{refs}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        ("!!float abc", "float"),
        ("!!float ''", "float"),  # IndexError inside PyYAML
        ("!!timestamp not-a-date", "timestamp"),
        ("!!int x1", "int"),
    ],
)
def test_a_bad_tag_is_located(tmp_path: Path, value: str, tag: str) -> None:
    error = _refused(tmp_path, f"server:\n  port: 8080\n  host: {value}\n")
    (problem,) = error.problems
    assert (problem.line, problem.path) == (3, "server.host")
    assert f"not a valid {tag} value" in problem.message


def test_a_five_thousand_digit_integer_is_located(tmp_path: Path) -> None:
    error = _refused(tmp_path, "server:\n  port: " + "9" * 5000 + "\n")
    (problem,) = error.problems
    assert (problem.line, problem.path) == (2, "server.port")


def test_a_nul_in_a_path_is_located(tmp_path: Path) -> None:
    text = GOOD.replace("9'}", '9\', policy_path: "./p\\0.yaml"}')
    error = _refused(tmp_path, text)
    (problem,) = error.problems
    assert (problem.line, problem.path) == (4, "tenants.configs.a.policy_path")
    assert "NUL" in problem.message


def test_a_raw_nul_byte_in_the_file_is_located(tmp_path: Path) -> None:
    error = _refused(tmp_path, "server:\n  port: 8080\n  host: a\x00b\n")
    assert error.problems[0].line == 3
    assert "invalid YAML" in error.problems[0].message


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    error = _refused(tmp_path, "x: 1\ny: " + "[" * 5000 + "]" * 5000 + "\n")
    assert error.problems[0].line == 2
    assert "brackets nest more than 1000 levels deep" in error.problems[0].message
    error = _refused(tmp_path, "x: " + "[" * 100 + "]" * 100 + "\n")
    assert (error.problems[0].line, error.problems[0].path) == (1, "x" + "[0]" * 63)
    assert f"nested more than {MAX_DEPTH} levels deep" in error.problems[0].message
    error = _refused(tmp_path, "".join(f"{'  ' * i}k{i}:\n" for i in range(200)))
    assert f"nested more than {MAX_DEPTH} levels deep" in error.problems[0].message
    assert error.problems[0].path.startswith("k0.k1.k2")


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    error = _refused(tmp_path, "server: {port: 8080}\nloop: &a [1, *a]\n")
    assert "refers to a node that contains it" in error.problems[0].message
    assert error.problems[0].line == 2
    error = _refused(tmp_path, "m: &m {self: *m}\n")
    assert "contains it" in str(error)


def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path: Path) -> None:
    bomb = _billion_laughs()
    assert len(bomb) < 400
    error = _refused(tmp_path, bomb)
    assert "aliases expand to more than" in str(error)
    (problem,) = error.problems
    assert (problem.line, problem.path) == (6, "f")  # the first node past the limit
    merge_bomb = "a0: &a0 {x: 1, y: 2}\n" + "".join(
        f"a{i}: &a{i} {{{', '.join(f'k{j}: *a{i - 1}' for j in range(9))}}}\n" for i in range(1, 10)
    )
    assert "aliases expand to more than" in str(_refused(tmp_path, merge_bomb))


def test_too_many_aliases_are_refused(tmp_path: Path) -> None:
    text = "base: &b 1\nlist: [" + ", ".join(["*b"] * (MAX_ALIASES + 1)) + "]\n"
    assert f"more than {MAX_ALIASES} aliases" in str(_refused(tmp_path, text))


def test_the_alias_limit_counts_only_values_aliases_add(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(yamlsource, "MAX_NODES", 1000)
    path = tmp_path / "c.yaml"
    literal = "".join(f"k{i}: [a, b, c, d]\n" for i in range(600))  # 3,600 values written
    path.write_text(literal)
    assert len(load_yaml(path).data) == 600
    path.write_text(literal + "x: &x [a, b, c, d, e, f, g, h, i]\ny: [" + "*x," * 110 + "]\n")
    with pytest.raises(ConfigError, match="more than 1000 values beyond those written"):
        load_yaml(path)


def test_ordinary_aliases_still_work(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "defaults: &d {backend_url: 'http://127.0.0.1:9', backend_timeout_ms: 1000}\n"
        "tenants:\n  configs:\n    a: *d\n    b: {<<: *d, backend_timeout_ms: 2000}\n".replace(
            "defaults:", "x-defaults:"
        )
    )
    doc = load_yaml(path)
    assert doc.data["tenants"]["configs"]["b"]["backend_timeout_ms"] == 2000
    assert doc.data["tenants"]["configs"]["a"]["backend_timeout_ms"] == 1000


def test_policy_files_get_the_same_treatment(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: '1.0'\nname: p\npolicies: !!float abc\n")
    problems = lint_policy_file(path, ["pii_detector"])
    assert [(p.line, p.path) for p in problems] == [(3, "policies")]
    path.write_text(_billion_laughs())
    with pytest.raises(ConfigError, match="aliases expand"):
        load_policy_file(path)


def test_reload_refuses_a_hostile_file_and_keeps_serving(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(GOOD)
    control = GatewayControl(load_config(path), tmp_path, tmp_path, "http://127.0.0.1:9")
    version = control.version
    for hostile in (_billion_laughs(), "x: " + "[" * 5000, "server: {port: !!float abc}\n"):
        path.write_text(hostile)
        outcome = asyncio.run(control.reload())
        assert not outcome.ok
        assert outcome.version == version
        assert outcome.error is not None and outcome.error.startswith(f"{path}:"), outcome
        assert "invalid YAML" in outcome.error
