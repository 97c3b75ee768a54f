"""The request path in the extproc worker: the gRPC loop, one exchange per request, its answer
handlers and what they send back to Envoy (worker process)."""
