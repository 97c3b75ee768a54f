"""The project's own gRPC API (``proto/checkstream/v1/classifier.proto``): its messages,
generated when the package is built. A remote classifier's client and server use them."""

from checkstream._proto.checkstream.v1 import classifier_pb2

__all__ = ["classifier_pb2"]
