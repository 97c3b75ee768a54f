"""Modules generated from ``proto/`` by grpcio-tools when the package is built (``setup.py``:
``pip install .`` or ``pip install -e .``); this file is the only one committed.

The runtime never runs the generator: a checkout that was never installed gets a clear error
instead of a half-working import.
"""

from pathlib import Path

if not (Path(__file__).parent / "checkstream" / "v1" / "classifier_pb2.py").is_file():
    raise ImportError(
        "checkstream's gRPC modules are generated from proto/ when the package is installed: "
        "run `pip install -e .` in the repository (or `pip install .`)"
    )
