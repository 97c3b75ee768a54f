"""``checkstream run``, ``serve``, ``classifiers serve`` and ``envoy render|drain``: the
commands that start, feed or stop the gateway's processes (CLI process; ``run`` becomes the
launcher, ``serve`` an extproc worker, ``classifiers serve`` a classifier server).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from checkstream.cli.options import (
    DEFAULT_CONFIG,
    add_config_option,
    compile_or_report,
    load_or_report,
)
from checkstream.config.model import LoadedConfig
from checkstream.config.yamlsource import ConfigError
from checkstream.ops import logs
from checkstream.policy.registry import PluginError


def register_run(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``run``: Envoy and the extproc workers, supervised."""
    run = commands.add_parser("run", help="start Envoy and extproc and supervise them")
    add_config_option(run, default=None)
    run.add_argument(
        "--demo",
        action="store_true",
        help="also start the built-in demo upstream; without -c, serve the bundled demo config "
        "with its state in a fresh temporary directory",
    )
    run.add_argument(
        "--demo-port", type=int, default=9001, metavar="N", help="demo upstream port (9001)"
    )
    run.add_argument(
        "--demo-chunk-delay-ms",
        type=float,
        default=40.0,
        metavar="MS",
        help="demo delay between streamed chunks (40)",
    )
    run.set_defaults(handler=_cmd_run)


def register_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve``: one extproc worker (``run`` starts these; alone, a sidecar)."""
    serve = commands.add_parser("serve", help="run one extproc worker (run starts these)")
    add_config_option(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    serve.add_argument(
        "--port", type=int, metavar="N", help="port to bind (default: server.extproc_port)"
    )
    # Set by `run`: where the launcher leaves reload and suspension orders (reloading.py).
    serve.add_argument("--control-dir", help=argparse.SUPPRESS)
    serve.add_argument(
        "--admin",
        action="store_true",
        help="also serve the admin API on server.admin_port (no `run` launcher: a sidecar)",
    )
    serve.set_defaults(handler=_cmd_serve)


def register_classifiers_serve(
    classifiers_commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add ``serve`` to the ``classifiers`` commands: a classifier server over gRPC."""
    classifiers_serve = classifiers_commands.add_parser(
        "serve",
        help="serve this config's classifiers over gRPC, for `type: remote` classifiers",
    )
    add_config_option(classifiers_serve)
    classifiers_serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (127.0.0.1)"
    )
    # Literal, not DEFAULT_PORT from checkstream.policy.classifier_server: importing it would
    # load grpc and the generated modules for every command.
    classifiers_serve.add_argument(
        "--port", type=int, default=50061, metavar="N", help="port to bind (50061)"
    )
    classifiers_serve.set_defaults(handler=_cmd_classifiers_serve)


def register_envoy(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``envoy render|drain``."""
    envoy = commands.add_parser("envoy", help="Envoy configuration")
    envoy_commands = envoy.add_subparsers(dest="envoy_command", required=True, metavar="COMMAND")
    render = envoy_commands.add_parser("render", help="print the Envoy bootstrap run uses")
    add_config_option(render)
    render.add_argument("-o", "--output", metavar="FILE", help="write here, not to stdout")
    render.set_defaults(handler=_cmd_envoy_render)
    drain = envoy_commands.add_parser(
        "drain",
        help="stop Envoy taking connections and wait (up to server.drain_timeout_s) until "
        "no request is in flight: a Kubernetes preStop hook",
    )
    add_config_option(drain)
    drain.set_defaults(handler=_cmd_envoy_drain)


def _no_config_hint(path: str) -> str:
    return (
        f"checkstream: {path}: file not found, so there is no config to run\n"
        "  to try CheckStream with a built-in backend (no API key): checkstream run --demo\n"
        "  to write a starter config here: checkstream init"
        " (then: checkstream run -c checkstream.yaml)"
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from checkstream.demo.state import new_demo_state
    from checkstream.ops.launcher import phase, run_gateway

    started = time.monotonic()
    if args.config:
        path = args.config
    elif args.demo:
        # A fresh directory per run, so one try's usage never adds up with another's.
        path = str(new_demo_state(args.demo_port))
    else:
        path = DEFAULT_CONFIG
    if not Path(path).exists():
        print(_no_config_hint(path), file=sys.stderr)
        return 1
    loaded = load_or_report(path)
    if loaded is None:
        return 1
    logs.configure(logs.resolve_format(loaded.model.server.log_format))
    if args.demo and not args.config:
        phase(started, "demo state for this run", directory=str(Path(path).parent))
    names = classifier_names(loaded)
    phase(
        started,
        "loading classifiers",
        config=path,
        tenants=len(loaded.model.tenants.configs),
        classifiers=", ".join(names),
    )
    # Compiled here too so a bad policy or plugin is reported once, before anything starts.
    if not compile_or_report(loaded):
        return 1
    extra: Callable[[], Awaitable[Callable[[], Awaitable[None]]]] | None = None
    if args.demo:
        from checkstream.demo import start_demo_upstream

        async def start_demo() -> Callable[[], Awaitable[None]]:
            upstream = await start_demo_upstream(
                "127.0.0.1", args.demo_port, args.demo_chunk_delay_ms
            )
            phase(
                started,
                "demo upstream started",
                url=f"http://127.0.0.1:{upstream.port}",
                formats="openai, anthropic",
                chunk_delay_ms=args.demo_chunk_delay_ms,
            )
            return upstream.close

        extra = start_demo
    return asyncio.run(run_gateway(loaded, extra_service=extra, started=started))


def classifier_names(loaded: LoadedConfig) -> list[str]:
    """The classifiers some tenant runs, in first-use order (what a worker will load)."""
    from checkstream.policy.guardrails import phase_classifiers

    model = loaded.model
    names: dict[str, None] = {}
    for tenant in model.tenants.configs.values():
        for phase, defaults in (
            (tenant.pipeline.ingress, model.pipeline.ingress),
            (tenant.pipeline.midstream, model.pipeline.midstream),
        ):
            names.update(dict.fromkeys(phase_classifiers(phase, defaults, tenant.classifiers)))
    return list(names)


def _cmd_serve(args: argparse.Namespace) -> int:
    from checkstream.gateway.server import serve

    loaded = load_or_report(args.config)
    if loaded is None:
        return 1
    worker = os.environ.get(logs.WORKER_ENV, "")
    logs.configure(
        logs.resolve_format(loaded.model.server.log_format),
        worker=int(worker) if worker.isdigit() else None,
    )
    port = args.port if args.port is not None else loaded.model.server.extproc_port
    control = Path(args.control_dir) if args.control_dir else None
    try:
        asyncio.run(serve(loaded, args.host, port, control, admin=args.admin))
    except ConfigError as exc:
        print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
        return 1
    except (OSError, PluginError) as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_classifiers_serve(args: argparse.Namespace) -> int:
    from checkstream.policy.classifier_server import servable_classifiers, serve

    # No secrets needed: this process scores texts and never calls a tenant's backend.
    loaded = load_or_report(args.config, require_secrets=False)
    if loaded is None:
        return 1
    logs.configure(logs.resolve_format(loaded.model.server.log_format))
    try:
        classifiers = servable_classifiers(loaded)
    except ConfigError as exc:
        print(f"checkstream: invalid configuration\n{exc}", file=sys.stderr)
        return 1
    except PluginError as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(serve(classifiers, args.host, args.port))
    except OSError as exc:
        print(f"checkstream: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_envoy_render(args: argparse.Namespace) -> int:
    from checkstream.ops.envoy_config import render_yaml

    loaded = load_or_report(args.config, require_secrets=False)
    if loaded is None:
        return 1
    rendered = render_yaml(loaded.model)
    if args.output is None:
        sys.stdout.write(rendered)
    else:
        Path(args.output).write_text(rendered)
    return 0


def _cmd_envoy_drain(args: argparse.Namespace) -> int:
    from checkstream.ops.launcher import drain_envoy

    loaded = load_or_report(args.config, require_secrets=False)
    if loaded is None:
        return 1
    server = loaded.model.server
    asyncio.run(drain_envoy(server.envoy_admin_port, server.drain_timeout_s))
    return 0
