"""CheckStream: a multi-tenant guardrail gateway for LLM traffic.

The plugin API is this package's top level::

    from checkstream import hookimpl, Classification, Span

``hookspecs.py`` is the whole contract (the hooks and when they run); ``types.py`` holds
the data they exchange; ``batching.py`` (``MicroBatcher``) and ``normalize.py`` are helpers a
plugin may use. Everything else is the gateway's own and may change without notice.
"""

from checkstream.hookspecs import hookimpl
from checkstream.types import Classification, Classifier, ClassifierFactory, Span

__all__ = ["Classification", "Classifier", "ClassifierFactory", "Span", "hookimpl"]
