"""Modules generated from ``proto/`` by grpcio-tools; this file is the only one committed.

Importing the package first makes sure they exist and match the .proto files (see
``extproc/protogen.py``), so ``from extproc._proto.checkstream.v1 import classifier_pb2``
also works in a fresh checkout that was never installed.
"""

from extproc.protogen import ensure_generated

ensure_generated()
