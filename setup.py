"""Build hooks: generate the gRPC modules from proto/ (see extproc/protogen.py), and map the
repository's extproc/ and plugins/ directories to the one installed package `checkstream`.

Everything else about the package is declared in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from setuptools import find_packages, setup
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
            target = Path(self.build_lib, "checkstream", "_proto")
        written = protogen.generate(ROOT / "proto", target)
        self.announce(f"generated {len(written)} files from proto/ into {target}", level=2)


# One top-level package, `checkstream`, from the repository's two directories.
PACKAGE_DIR = {"checkstream": "extproc", "checkstream.plugins": "plugins"}
PACKAGES = [
    name
    for package, directory in PACKAGE_DIR.items()
    for name in (package, *(f"{package}.{sub}" for sub in find_packages(directory)))
]

setup(cmdclass={"build_py": BuildPyWithProtos}, package_dir=PACKAGE_DIR, packages=PACKAGES)
