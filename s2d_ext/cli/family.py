"""``s2d family build|check``: the local nested model family (see :mod:`s2d_ext.train.family`)."""

from __future__ import annotations

import argparse
import json

from s2d_ext.cli._common import add_runtime_args, apply_runtime

SIZES = ("tiny", "bench")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "family",
        help="build or check the local model family (tokenizer, targets, sorted draft)",
        description="Local nested model family trained on the Python standard library (no downloads). "
        "Cache: --cache-dir, else $S2D_FAMILY_DIR, else ~/.cache/s2d_ext/family.",
    )
    actions = parser.add_subparsers(dest="family_command", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="build the family (does nothing when the cache is complete)")
    build.add_argument("--size", choices=SIZES, default="tiny", help="family size (default: tiny)")
    build.add_argument("--cache-dir", default=None, help="cache root (default: $S2D_FAMILY_DIR or ~/.cache)")
    build.add_argument("--force", action="store_true", help="rebuild even when the cache is complete")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        metavar="N",
        help="also save the draft's reduced vocabulary: the N most frequent training tokens (added to a "
        "complete cache without rebuilding it)",
    )
    add_runtime_args(build, dtype=False)
    build.set_defaults(device=None)
    check = actions.add_parser("check", help="say whether the cached family is complete; print its manifest")
    check.add_argument("--size", choices=SIZES, default="tiny")
    check.add_argument("--cache-dir", default=None)
    check.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    return parser


def format_manifest(manifest: dict) -> str:
    """A text table of the family's models: params, layers, training tokens (own / including the model it was
    grown or cut from), held-out loss."""
    from s2d_ext.train.family import get_spec, total_train_tokens

    spec = get_spec(manifest["size"]) if manifest["size"] in ("tiny", "bench") else None
    lines = [
        f"{'model':<16}{'params':>12}{'layers':>8}{'hidden':>8}{'train tokens (own / total)':>28}"
        "  held-out loss (nats/token)"
    ]
    for name, info in manifest["models"].items():
        total = info.get("train_tokens_total")
        if total is None and spec is not None:
            total = total_train_tokens(spec, manifest["models"], name)
        tokens = f"{info['train_tokens']:,} / {total:,}" if total is not None else f"{info['train_tokens']:,}"
        loss = info["heldout_loss"]
        loss_text = (
            " ".join(f"exit {e}: {v:.3f}" for e, v in loss.items())
            if isinstance(loss, dict)
            else f"{loss:.3f}"
        )
        lines.append(
            f"{name:<16}{info['params']:>12,}{info['layers']:>8}{info['hidden_size']:>8}"
            f"{tokens:>28}  {loss_text}"
        )
    return "\n".join(lines)


def run(args) -> int:
    from s2d_ext.train import family

    if args.family_command == "check":
        reason = family.check_family(args.size, args.cache_dir)
        root = family.family_dir(args.size, args.cache_dir)
        if reason is not None:
            print(f"family {args.size!r} at {root}: NOT complete ({reason})")
            return 1
        manifest = json.loads((root / family.MANIFEST).read_text())
        print(
            json.dumps(manifest, indent=2)
            if args.json
            else f"family {args.size!r} at {root}: complete\n" + format_manifest(manifest)
        )
        return 0
    apply_runtime(args)
    root = family.build_family(
        args.size,
        args.cache_dir,
        force=args.force,
        progress=not args.no_progress,
        device=args.device,
        draft_vocab=args.draft_vocab,
    )
    manifest = json.loads((root / family.MANIFEST).read_text())
    print(format_manifest(manifest))
    return 0
