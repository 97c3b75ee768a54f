"""Python modules for the project's gRPC APIs, generated from ``proto/`` by grpcio-tools.

Generated code is never committed: it would drift from the .proto files and tie the
repository to one protoc version. It is written into ``extproc/_proto/``:

- at build time by ``setup.py`` (a ``build_py`` hook; grpcio-tools is a build requirement),
  into the wheel for ``pip install .`` and into the source tree for ``pip install -e .``;
- at import time by :func:`ensure_generated`, which ``extproc/_proto/__init__.py`` calls,
  when running from a source checkout whose modules are missing or older than the .proto
  files (a fresh clone run without installing, or a .proto edited after ``pip install -e``).

Only message modules (``*_pb2.py``) and their type stubs (``*_pb2.pyi``) are generated. The
gRPC glue that ``--grpc_python_out`` would add is untyped (strict mypy refuses calls into it)
and imports ``checkstream.v1`` as a top-level package, which it is not here; the few lines of
service wiring it would hold live in ``extproc/policy/classifier_server.py``, method names
taken from the
descriptor.

Standard library only at import time: ``setup.py`` loads this file by path, in an isolated
build environment where the package's own dependencies are not installed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from importlib import resources
from pathlib import Path

#: Where the generated modules go: ``checkstream._proto.checkstream.v1.classifier_pb2``.
PACKAGE_DIR = Path(__file__).resolve().parent / "_proto"
#: Digest of the .proto files the modules were generated from; written last, so its presence
#: means a complete generation.
STAMP = "SOURCE_SHA256"
# Generated stubs are not ours to fix (protoc writes bare ``Mapping``); keep their types for
# callers but do not let strict mypy report inside them.
_PYI_HEADER = "# mypy: ignore-errors\n"


def source_digest(proto_root: Path) -> str:
    """One digest over every .proto file's path and content under ``proto_root``."""
    digest = hashlib.sha256()
    for path in sorted(proto_root.rglob("*.proto")):
        digest.update(path.relative_to(proto_root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def generate(proto_root: Path, out_dir: Path) -> list[Path]:
    """Compile every .proto under ``proto_root`` into ``out_dir``; return the files written.

    Files are staged in a temporary directory inside ``out_dir`` and moved into place one by
    one with ``os.replace`` (atomic on one file system), so processes generating at the same
    time (parallel test workers, extproc workers) never import a half-written module.
    """
    from grpc_tools import protoc  # type: ignore[import-untyped]  # build-time dependency

    protos = sorted(p.relative_to(proto_root).as_posix() for p in proto_root.rglob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {proto_root}")
    # The well-known types (google/protobuf/*.proto) ship inside grpcio-tools.
    well_known = resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".generating-") as tmp:
        staged = Path(tmp)
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"--proto_path={proto_root}",
                f"--proto_path={well_known}",
                f"--python_out={staged}",
                f"--pyi_out={staged}",
                *protos,
            ]
        )
        if code != 0:
            raise RuntimeError(f"grpc_tools.protoc failed (exit {code}) on {proto_root}")
        for stub in staged.rglob("*.pyi"):
            stub.write_text(_PYI_HEADER + stub.read_text())
        # Regular packages, not namespace ones: importable the same way by every finder
        # (setuptools' editable finder included) and by mypy.
        for directory in [d for d in staged.rglob("*") if d.is_dir()]:
            (directory / "__init__.py").touch()
        (staged / STAMP).write_text(source_digest(proto_root) + "\n")
        # Deepest first and the stamp last: a package appears only once its modules exist,
        # and the stamp only once everything is in place.
        files = [p for p in staged.rglob("*") if p.is_file()]
        files.sort(key=lambda p: (p.name == STAMP, -len(p.parts), p.name == "__init__.py"))
        for source in files:
            target = out_dir / source.relative_to(staged)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
            written.append(target)
    return written


def source_checkout() -> Path | None:
    """The repository root when running from a source checkout (editable or not), else None."""
    root = PACKAGE_DIR.parents[1]
    if (root / "pyproject.toml").is_file() and (root / "proto" / "checkstream").is_dir():
        return root
    return None


def ensure_generated() -> None:
    """Make sure ``extproc/_proto`` holds modules matching ``proto/``; generate them if not."""
    root = source_checkout()
    stamp = PACKAGE_DIR / STAMP
    if root is None:
        # An installed wheel: its build generated the modules; there is no source to use.
        if not stamp.is_file():
            raise ImportError(
                f"CheckStream's generated gRPC modules are missing from {PACKAGE_DIR}; "
                "reinstall checkstream (its build generates them with grpcio-tools)"
            )
        return
    proto_root = root / "proto"
    if stamp.is_file() and stamp.read_text().strip() == source_digest(proto_root):
        return
    try:
        generate(proto_root, PACKAGE_DIR)
    except ImportError:
        raise ImportError(
            f"the gRPC modules in {PACKAGE_DIR} are missing or older than {proto_root}, and "
            "grpcio-tools is not installed to regenerate them: run `pip install -e .` "
            "(its build generates them) or `pip install grpcio-tools`"
        ) from None
