"""Ray Serve: ``s2d serve``'s OpenAI server on several replicas (data parallelism, one machine or many).

Use
---
::

    serve run s2d_ext.integrations.ray_serve:app_builder \\
        target=qwen-coder-1.5b draft=~/.cache/s2d_ext/drafts/qwen-coder-0.5b-s2d dtype=bfloat16 num_replicas=2

Every ``key=value`` but the Ray ones below is an ``s2d serve`` flag (``target`` -> ``--target``,
``max_running`` -> ``--max-running``; ``target=a,b`` serves several targets, as repeated ``--target`` flags).
Each replica runs ``s2d serve``'s own code path (:func:`s2d_ext.cli.serve.run`: the same checks, loading and
:func:`s2d_ext.server.app.build_app`) in its constructor, so the replicas answer exactly as ``s2d serve``
does; Ray's HTTP proxy (``http://127.0.0.1:8000`` by default) spreads the requests over them, a client that
disconnects aborts its request on its replica, and Ray replaces a replica that dies (the requests in flight
on it fail). Every response carries an ``x-s2d-replica`` header naming the replica (its Ray actor's name).

Ray's keys
----------
==================== ==============================================================================
``num_replicas``     replicas (default 1), or ``auto`` for Ray's autoscaling
``num_cpus``         CPUs each replica reserves (default 1; give ``threads`` too, the torch threads)
``num_gpus``         GPUs each replica reserves (default 1 with ``device=cuda...``, else 0)
``max_ongoing_requests`` requests Ray lets into one replica at once (default 256: the engine batches them)
==================== ==============================================================================

Bad arguments (an unknown key, a missing path) fail in :func:`app_builder`, before any replica starts,
with one line. Importing this module without Ray raises an ImportError of one line naming
``pip install 's2d_ext[ray]'``.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping
from typing import Any

try:
    from ray import serve
except ImportError as _missing:
    raise ImportError(
        f"s2d_ext.integrations.ray_serve needs Ray Serve ({_missing.name or 'ray'} is missing): "
        "pip install 's2d_ext[ray]'"
    ) from None

REPLICA_HEADER = "x-s2d-replica"
RAY_KEYS = ("num_replicas", "num_cpus", "num_gpus", "max_ongoing_requests")
DEFAULT_MAX_ONGOING_REQUESTS = 256
#: Ray Serve's proxy checks, relaxed for a busy small host: Ray kills a proxy that is not ready within 5 s,
#: and on a loaded 2-core machine its start-up (imports) took longer. Set in the environment before
#: ``serve.start()`` (and in the workers' ``runtime_env``).
SLOW_HOST_ENV = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "30",
}


def serve_argv(args: Mapping[str, Any]) -> list[str]:
    """The ``s2d serve`` arguments of a builder's ``args`` (Ray's keys left out)."""
    argv: list[str] = []
    for key, value in args.items():
        if key in RAY_KEYS:
            continue
        if isinstance(value, (list, tuple)):
            values = [str(v) for v in value]
        elif key == "target":  # NOTE: only target splits on commas: exits / thresholds are comma lists
            values = [v for v in str(value).split(",") if v]
        else:
            values = [str(value)]
        for v in values:  # NOTE: a path may come as draft=~/... (no shell expands it there)
            argv += [f"--{key.replace('_', '-')}", os.path.expanduser(v) if v.startswith("~") else v]
    return argv


def parse_serve_args(argv: list[str]):
    """``s2d serve``'s parsed arguments, or ValueError with argparse's one error line."""
    from s2d_ext.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(["serve", *argv])
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        raise ValueError(f"s2d_ext ray_serve: {lines[-1] if lines else 'bad arguments'}") from None


def build_app(argv: list[str]) -> Any:
    """The FastAPI app that ``s2d serve ARGV`` would serve, with its engine running (``s2d serve``'s own
    :func:`~s2d_ext.cli.serve.build`: the same checks, loading and app)."""
    from s2d_ext.cli import serve as serve_cli

    return serve_cli.build(parse_serve_args(argv))[0]


class _ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that made it."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


class S2DReplica:
    """One replica: ``s2d serve ARGV``'s engine and app (built by Ray after the constructor)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = list(argv)
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()

    def __serve_build_asgi_app__(self) -> Any:
        app = build_app(self.argv)
        app.add_middleware(_ReplicaHeader, replica=self.replica)
        return app


S2DServer = serve.deployment(name="S2DServer", max_constructor_retry_count=3)(serve.ingress()(S2DReplica))


def _check(args) -> None:  # noqa: ANN001
    """The paths and flag pairs, checked before a replica starts (one line each, as ``s2d serve`` says)."""
    from s2d_ext.cli._common import checked_target_refs

    if (args.family is None) == (args.target is None):
        raise ValueError("s2d_ext ray_serve: give either family=... or target=... (with draft=...)")
    if args.target is not None:
        if args.draft is None:
            raise ValueError("s2d_ext ray_serve: target needs draft")
        try:
            checked_target_refs(args)
        except (FileNotFoundError, ValueError) as exc:
            raise ValueError(f"s2d_ext ray_serve: {exc}") from None


def app_builder(args: Mapping[str, Any]) -> Any:
    """The Ray Serve application of ``serve run s2d_ext.integrations.ray_serve:app_builder key=value ...``
    (also ``serve.run(app_builder({...}))``): ``s2d serve``'s flags plus Ray's keys (module docstring)."""
    args = dict(args)
    argv = serve_argv(args)
    parsed = parse_serve_args(argv)
    _check(parsed)
    replicas = str(args.get("num_replicas", 1))
    gpu = str(parsed.device).startswith("cuda")
    try:
        options: dict[str, Any] = {
            "num_replicas": replicas if replicas == "auto" else int(replicas),
            "max_ongoing_requests": int(args.get("max_ongoing_requests", DEFAULT_MAX_ONGOING_REQUESTS)),
            "ray_actor_options": {
                "num_cpus": float(args.get("num_cpus", 1)),
                "num_gpus": float(args.get("num_gpus", 1 if gpu else 0)),
            },
        }
    except ValueError as exc:
        raise ValueError(f"s2d_ext ray_serve: a Ray key is not a number ({exc})") from None
    return S2DServer.options(**options).bind(argv)
