"""The CheckStream plugin contract. This file is all a plugin author needs to read.

A plugin is a module registered in the ``checkstream`` entry-point group of its package::

    [project.entry-points.checkstream]
    my_plugin = "my_package.checkstream_plugin"

and implements one or more hooks below, marked with ``@hookimpl``. CheckStream's own
classifiers (``plugins/``) are registered exactly this way.

A classifier takes a batch of texts and returns one ``Classification`` per text: a score in
[0, 1] (policies compare it with a threshold) and, if the classifier can locate what it
found, character spans with labels (policies with ``action: redact`` replace those spans
with ``[REDACTED:<LABEL>]``). ``classify`` may be a plain function, which CheckStream runs in
a worker thread so it never blocks the event loop, or a coroutine function, which is
awaited. A classifier whose work takes microseconds (a regex) may set ``inline = True`` to
skip the thread hand-off. A classifier meant for some texts only may set ``sources`` to a
set of ``"system"`` (the operator's instructions), ``"user"``, ``"assistant"`` (earlier model
turns), ``"tool"`` (tool results, documents) and ``"answer"`` (the answer being checked):
it then sees only those, and the others score 0 (a prompt-injection detector reads the
user's and tools' words, not the system prompt that legitimately gives instructions).

Errors: a plugin that fails to import refuses start-up, naming the plugin. A classifier
that raises, or returns anything but one well-formed ``Classification`` per text, fails
the request closed (a 5xx in the tenant's format, counted), unless that tenant chose
``fail_mode: open``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping

import pluggy

from checkstream.types import Classifier, ClassifierFactory

PROJECT = "checkstream"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def checkstream_classifier_types() -> Mapping[str, ClassifierFactory]:  # type: ignore[empty-body]
    """Classifier types offered, by type name; one needing no settings also works by name."""


@hookspec
def checkstream_startup(classifiers: Mapping[str, Classifier]) -> Awaitable[None] | None:
    """A process starts serving these classifiers (a worker, after a reload too, or the
    classifier server), before any traffic; never during ``config check``. Load what they
    need (model files) here, once per process; run in a thread, so it may block."""


@hookspec
def checkstream_shutdown() -> Awaitable[None] | None:
    """A process that classified stops (worker, classifier server, ``classifiers score``):
    release what the plugin holds (channels, pools); may return an awaitable."""
