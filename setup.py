"""Build hook only: generate the gRPC modules from proto/ (see extproc/protogen.py).

Everything else about the package is declared in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _protogen() -> ModuleType:
    # Loaded by path: importing the extproc package would need its runtime dependencies,
    # which the isolated build environment does not have.
    spec = importlib.util.spec_from_file_location(
        "checkstream_protogen", ROOT / "extproc" / "protogen.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    """build_py, then the generated modules: into the wheel's build dir, or for an editable
    install into the source tree, which is where that install imports extproc from (the
    PEP 660 sub-command protocol in setuptools/command/build.py asks for exactly that)."""

    def run(self) -> None:
        super().run()
        protogen = _protogen()
        if self.editable_mode:
            target = protogen.PACKAGE_DIR
        else:
            target = Path(self.build_lib, "extproc", "_proto")
        written = protogen.generate(ROOT / "proto", target)
        self.announce(f"generated {len(written)} files from proto/ into {target}", level=2)


setup(cmdclass={"build_py": BuildPyWithProtos})
