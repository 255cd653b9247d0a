"""``s2d serve --tp N``: one server over N processes, each holding a tensor-parallel shard of every target.

Launch with ``torchrun --nproc-per-node N -m s2d_ext serve --tp N --target ... --draft ...`` (any launcher
that sets torchrun's ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` will do). The ranks join
a gloo group, load their shards (transformers' ``tp_plan="auto"``) and the draft, then rank 0 serves HTTP
and steps its engine in lockstep with the others (:mod:`s2d_ext.server.tp.lockstep`).

Checked before any model loads, each with one line from rank 0 (status 1): ``--tp`` other than the number
of processes, a target whose attention heads or key/value heads ``--tp`` does not divide (or without a
tensor-parallel plan), ``--family`` or a GGUF target. A rank that does not join within ``S2D_TP_TIMEOUT``
seconds (60) ends the start-up with one line too.

When a rank dies or hangs (a step waits ``S2D_TP_TIMEOUT`` seconds at most), rank 0 fails the running
requests with the error, refuses new ones, stops its server and exits with status 1: the ranks' caches may
no longer agree, so nothing goes on serving. An echoed prompt's log-probabilities (``echo`` with
``logprobs``) need a forward outside the step: rank 0 sends it to the other ranks like a step.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from datetime import timedelta

from s2d_ext.server.tp.lockstep import LockstepEngine, follower_loop

__all__ = ["LockstepEngine", "follower_loop", "run_tp", "check_tp"]

DEFAULT_TIMEOUT_S = 60.0


def timeout_s() -> float:
    return float(os.environ.get("S2D_TP_TIMEOUT") or DEFAULT_TIMEOUT_S)


class TPError(ValueError):
    """A bad ``--tp`` set-up: one line, printed by rank 0."""


def check_tp(args, world_size: int | None) -> None:
    """Raise :class:`TPError` when ``args`` cannot run over ``world_size`` processes (no model loads)."""
    tp = args.tp
    launch = f"torchrun --nproc-per-node {tp} -m s2d_ext serve --tp {tp} ..."
    if world_size is None:
        raise TPError(
            f"--tp {tp} needs {tp} processes started by torchrun (no WORLD_SIZE is set): run {launch}"
        )
    if world_size != tp:
        raise TPError(f"--tp {tp} needs {tp} processes, this run has {world_size}: run {launch}")
    if args.family is not None or args.target is None:
        raise TPError("--tp serves --target checkpoints (with --draft), not --family")
    if args.gguf_file is not None:
        raise TPError("--tp does not serve GGUF targets: give an HF checkpoint folder")
    from s2d_ext.cli._common import checked_target_refs

    for ref in checked_target_refs(args):
        if ref.is_gguf:
            raise TPError(f"--tp does not serve GGUF targets ({ref.name}): give an HF checkpoint folder")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(ref.folder))
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = getattr(text, "num_attention_heads", None)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        if heads is None or not getattr(text, "base_model_tp_plan", None):
            raise TPError(
                f"--target {ref.name} ({type(config).__name__}) has no tensor-parallel plan in transformers"
            )
        if heads % tp or kv_heads % tp:
            raise TPError(
                f"--tp {tp} must divide the attention heads of --target {ref.name}: num_attention_heads is "
                f"{heads} and num_key_value_heads {kv_heads}"
            )


def run_tp(args, build_engine) -> int:
    """``s2d serve --tp N`` on this rank: rank 0 serves, the others follow; returns the exit status.

    ``build_engine(args) -> (Engine, tokenizer, line)`` is :func:`s2d_ext.cli.serve.build_engine`, passed in
    (that module calls this one: importing it back would be a cycle)."""
    env_world = os.environ.get("WORLD_SIZE")
    rank = int(os.environ.get("RANK", "0"))
    world = int(env_world) if env_world else None
    try:
        check_tp(args, world)
    except (TPError, OSError, ValueError) as exc:
        return _refuse(rank, str(exc))
    import torch.distributed as dist

    seconds = timeout_s()
    try:
        # NOTE: the timeout bounds the start-up (every rank must join) and each collective of a step.
        dist.init_process_group("gloo", timeout=timedelta(seconds=seconds))
        control = dist.new_group(backend="gloo", timeout=timedelta(days=365))
    except Exception as exc:  # noqa: BLE001 (DistStoreError, a refused connection, ...)
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        line = (
            f"rank {rank}: the {world} ranks of --tp {args.tp} did not all join at {where} within "
            f"{seconds:g} s ({first})"
        )
        print(f"error: {line}", file=sys.stderr)
        return 1
    try:
        if rank == 0:
            return _serve(args, control, build_engine)

        engine, _, _ = build_engine(args)
        return follower_loop(engine, control)
    finally:
        # NOTE: a group whose peer is gone may not shut down cleanly: leave the rest to process exit.
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _refuse(rank: int, line: str) -> int:
    if rank == 0:
        print(f"error: {line}", file=sys.stderr)
    return 1


def _serve(args, control, build_engine) -> int:
    import uvicorn

    from s2d_ext.server.app import build_app
    from s2d_ext.server.async_engine import AsyncEngine

    engine, tokenizer, line = build_engine(args)
    failure: list[str] = []
    server: list[uvicorn.Server] = []

    def on_failure(reason: str) -> None:
        failure.append(reason)
        print(f"error: tensor-parallel step failed, a rank is gone or out of step: {reason}", file=sys.stderr)

        def stop():  # NOTE: a moment for the failed requests' errors to reach their clients
            if server:
                server[0].should_exit = True

        threading.Timer(1.0, stop).start()

    lockstep = LockstepEngine(engine, control, on_failure=on_failure)
    # NOTE: the app's one function for the engine thread, an echoed prompt's log-probabilities, goes
    # through the lockstep engine's prompt_logprobs (every rank runs the forward).
    async_engine = AsyncEngine(lockstep)
    app = build_app(async_engine, tokenizer)
    print(f"{line} (tensor parallel over {args.tp} processes)", flush=True)
    server.append(uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info")))
    try:
        server[0].run()
    finally:
        async_engine.close()
        if not async_engine._thread.is_alive():  # NOTE: never a collective beside a running step
            lockstep.stop()
    return 1 if failure else 0
