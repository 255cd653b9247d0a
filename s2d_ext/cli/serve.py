"""``s2d serve``: the OpenAI-compatible reference server (:mod:`s2d_ext.server`) over one engine."""

from __future__ import annotations

import argparse

from s2d_ext.cli import UsageError
from s2d_ext.cli._common import (
    add_runtime_args,
    apply_runtime,
    checked_target_refs,
    float_list,
    int_list,
    load_targets_and_draft,
    positive_int,
    run_compute,
    torch_dtype,
)
from s2d_ext.packaged_models import ALIASES_HELP


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible server (/v1/completions, /v1/chat/completions) with continuous batching",
        description="Serve --target (repeat it: one draft for several targets, the request's model picks "
        "one; or the largest target of the local --family) with the sorted draft --draft over HTTP: "
        "/v1/completions and /v1/chat/completions, streaming with SSE. Needs the serve extra: pip install "
        "'s2d_ext[serve]'.",
    )
    parser.add_argument(
        "--family", choices=("tiny", "bench"), default=None, help="serve a local model family"
    )
    parser.add_argument("--cache-dir", default=None, help="family cache root (with --family)")
    parser.add_argument(
        "--target",
        action="append",
        default=None,
        help=f"target: an HF checkpoint folder, a .gguf file, or {ALIASES_HELP}; repeat it to serve several "
        "targets that share the draft's tokenizer (one engine, one draft; clients pick by model name)",
    )
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside the --target folder")
    parser.add_argument("--draft", default=None, help="sorted draft HF checkpoint folder (same vocabulary)")
    parser.add_argument("--exits", type=int_list, default=None, help="draft exits, e.g. 6,9,12")
    parser.add_argument("--thresholds", type=float_list, default=None, help="exit thresholds, one per exit")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --target)")
    parser.add_argument(
        "--model-name", default=None, help="the model name clients send (default: the target's; one target)"
    )
    parser.add_argument("--num-draft-tokens", type=positive_int, default=5, help="draft tokens per step (5)")
    parser.add_argument(
        "--draft-length",
        choices=("fixed", "heuristic", "confidence"),
        default="heuristic",
        help="(heuristic)",
    )
    parser.add_argument(
        "--max-running", type=positive_int, default=None, help="most requests in the batch (default: no cap)"
    )
    parser.add_argument(
        "--tp",
        type=positive_int,
        default=None,
        help="tensor parallelism over N processes, one shard of each target per process: "
        "torchrun --nproc-per-node N -m s2d_ext serve --tp N ... (rank 0 serves HTTP)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=8000, help="listen port, 0-65535 (8000)")
    add_runtime_args(parser, inference=True)
    return parser


def port_number(text: str) -> int:
    """A TCP port, 0-65535 (argparse type; 0 = any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {value}")
    return value


def run(args) -> int:
    if args.tp is not None:
        from s2d_ext.cli.serve_tp import run_tp

        return run_tp(args, build_engine)
    from s2d_ext.server.launch import serve

    app, line = build(args)
    print(line)
    serve(app, args.host, args.port)
    return 0


def build(args):
    """The checked arguments' app (its engine running) and the line that says what it serves: what
    :func:`run` serves, and what each replica of :mod:`s2d_ext.integrations.ray_serve` builds."""
    from s2d_ext.server.app import build_app
    from s2d_ext.server.async_engine import AsyncEngine

    engine, tokenizer, line = build_engine(args)
    return build_app(AsyncEngine(engine), tokenizer), line


def build_engine(args):
    """(engine, tokenizer, line) of the checked arguments: the models loaded, nothing served yet (what each
    rank of ``--tp`` builds: :mod:`s2d_ext.cli.serve_tp`)."""
    if (args.family is None) == (args.target is None):
        raise UsageError("give either --family or --target (with --draft)")
    if args.target is not None and args.draft is None:
        raise UsageError("--target needs --draft")
    if args.gguf_file is not None and args.target is None:
        raise UsageError("--gguf-file goes with --target")
    if args.model_name is not None and args.target is not None and len(args.target) > 1:
        raise UsageError("--model-name goes with one --target (several are served by their own names)")
    from s2d_ext.server.launch import check_installed

    check_installed()
    # NOTE: every path is checked before a model loads (one error line, not a transformers traceback).
    refs = checked_target_refs(args) if args.target is not None else None
    apply_runtime(args)
    from s2d_ext.engine import Engine, TargetConfig

    if args.family is not None:
        from s2d_ext.train.family import load_family

        # NOTE: the family's tiny models are float32-trained: bfloat16 would only change their outputs.
        dtype = torch_dtype(args.dtype or "float32")
        tokenizer, family_targets, draft = load_family(
            args.family, args.cache_dir, device=args.device, dtype=dtype
        )
        name = list(family_targets)[-1]  # the largest
        targets = {args.model_name or name: family_targets[name]}
    else:
        dtype, kernels = run_compute(args)
        tokenizer, targets, draft = load_targets_and_draft(args, refs, dtype, kernels)
        if args.model_name is not None:
            targets = {args.model_name: next(iter(targets.values()))}
    configs = {
        name: TargetConfig(model, args.num_draft_tokens, args.draft_length, args.thresholds)
        for name, model in targets.items()
    }
    engine = Engine(draft, configs, max_running=args.max_running)
    line = f"serving {', '.join(map(repr, configs))} (draft exits {draft.exits}) on http://{args.host}:{args.port}/v1"
    return engine, tokenizer, line
