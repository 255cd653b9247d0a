"""Argument types and helpers shared by the subcommands.

NOTE: every path and device a user names is checked here, before any model loads, so a typo costs one clear
``error: --flag ...`` line instead of a traceback from transformers or torch ("Repo id must use alphanumeric
chars", "Torch not compiled with CUDA enabled").
"""

from __future__ import annotations

import argparse
from pathlib import Path

# NOTE: the argument types live a layer down, where the bench's arguments (s2d_ext.bench.arguments) reach
# them too; the commands import them from here.
from s2d_ext._argtypes import (  # noqa: F401
    DTYPES,
    float_list,
    int_list,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

#: files of which a folder must hold one to be a tokenizer folder transformers can load
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def add_runtime_args(parser: argparse.ArgumentParser, *, dtype: bool = True, inference: bool = False) -> None:
    """--device, --threads (and --dtype). ``inference``: --dtype defaults to the fast one for the device
    and --kernels picks the models' kernels (s2d_ext.compute); otherwise --dtype defaults to float32."""
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default: 1; see the README on threads)",
    )
    if dtype and inference:
        parser.add_argument(
            "--dtype",
            choices=DTYPES,
            default=None,
            help="model dtype (default: bfloat16 where it is fast, on GPUs and CPUs; the run says which)",
        )
    elif dtype:
        parser.add_argument(
            "--dtype", choices=DTYPES, default="float32", help="model dtype (default: float32)"
        )
    if inference:
        parser.add_argument(
            "--kernels",
            choices=("invariant", "torch"),
            default=None,
            help="the models' kernels: invariant (s2d's row-invariant ones: a verify forward costs about one "
            "decode step on a CPU, and greedy output is exactly generate()'s in any dtype) or torch "
            "(default: invariant on CPUs, torch on GPUs)",
        )


def run_compute(args) -> tuple:
    """(dtype, kernels) of an inference run from ``--device`` / ``--dtype`` / ``--kernels``; prints which."""
    from s2d_ext import compute

    dtype, kernels, line = compute.choose(
        args.device, torch_dtype(args.dtype) if args.dtype else None, getattr(args, "kernels", None)
    )
    print(f"s2d: {line}")
    return dtype, kernels


def apply_runtime(args) -> None:
    """Checks ``--device`` (when the subcommand has one) and applies ``--threads``."""
    import torch

    from s2d_ext._machine import DEFAULT_CPU_THREADS

    if getattr(args, "device", None) is not None:
        check_device(args.device)
    torch.set_num_threads(getattr(args, "threads", None) or DEFAULT_CPU_THREADS)


def check_device(name: str, flag: str = "--device") -> None:
    """ValueError with one line unless ``name`` is a torch device this process can use."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {name}: not a torch device (try cpu, cuda or cuda:1)") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(
                f"{flag} {name}: this torch ({torch.__version__}) is a CPU build without CUDA; "
                "use --device cpu, or install a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"{flag} {name}: torch has CUDA {torch.version.cuda} but sees no GPU here")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"{flag} {name}: there are only {count} CUDA device(s) (cuda:0 to cuda:{count - 1})"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} {name}: s2d_ext runs on cpu, cuda or mps devices")


def checkpoint_folder(flag: str, path: str) -> Path:
    """``path`` as a local HF checkpoint folder (with config.json), else FileNotFoundError naming ``flag``."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{flag} {path!r} does not exist (expected a local folder with config.json)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {path!r} is not an HF checkpoint folder (no config.json)")
    return folder


def tokenizer_folder(flag: str, path: str) -> Path:
    """``path`` as a local folder holding a tokenizer, else FileNotFoundError naming ``flag``."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {path!r} is not a folder (s2d_ext loads local tokenizers)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{flag} {path!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "pass --tokenizer FOLDER"
        )
    return folder


def checked_target_paths(args):
    """``--target`` (folder, .gguf or a packaged model's alias, with ``--gguf-file``), ``--draft`` and
    ``--tokenizer`` checked before anything loads; returns the target's
    :class:`~s2d_ext.checkpoints.TargetRef`."""
    from s2d_ext import checkpoints

    ref = checkpoints.resolve_target(args.target, args.gguf_file)
    checkpoint_folder("--draft", args.draft)
    if args.tokenizer is not None:
        tokenizer_folder("--tokenizer", args.tokenizer)
    elif not ref.is_gguf:  # NOTE: a GGUF file carries its tokenizer
        tokenizer_folder("--target (its tokenizer; or pass --tokenizer)", str(ref.folder))
    return ref


def checked_target_refs(args) -> list:
    """Every ``--target`` (a list: the flag repeats), ``--draft`` and ``--tokenizer`` checked before anything
    loads; returns the targets' :class:`~s2d_ext.checkpoints.TargetRef`, in order."""
    from s2d_ext import checkpoints

    if args.gguf_file is not None and len(args.target) > 1:
        raise ValueError("--gguf-file goes with one --target")
    refs = [checkpoints.resolve_target(t, args.gguf_file) for t in args.target]
    names = [ref.name for ref in refs]
    if len(set(names)) != len(names):
        raise ValueError(f"--target names a model twice ({', '.join(names)})")
    checkpoint_folder("--draft", args.draft)
    if args.tokenizer is not None:
        tokenizer_folder("--tokenizer", args.tokenizer)
    elif not refs[0].is_gguf:  # NOTE: a GGUF file carries its tokenizer
        tokenizer_folder("--target (its tokenizer; or pass --tokenizer)", str(refs[0].folder))
    return refs


def load_targets_and_draft(args, refs, dtype, kernels: str = "torch"):
    """(tokenizer, {name: target}, draft) of every ``--target`` with one ``--draft`` on ``--device``, on
    ``kernels``: the draft borrows its embedding and head from the target it was cut from (or loads them from
    the base it names), and a target with another vocabulary than the draft's is refused."""
    from s2d_ext import checkpoints, compute

    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = checkpoints.load_tokenizer(refs[0])
    # NOTE: --tp (s2d serve): every rank loads its shard of each target (transformers' tp_plan).
    tp = {"tp_plan": "auto"} if getattr(args, "tp", None) is not None else {}
    targets = {ref.name: checkpoints.load_target(ref, dtype=dtype, device=args.device, **tp) for ref in refs}
    draft = checkpoints.load_draft(
        args.draft,
        list(targets.values()),
        exits=args.exits,
        thresholds=args.thresholds,
        dtype=dtype,
        device=args.device,
    )
    for name, target in targets.items():
        size = int(target.get_output_embeddings().weight.shape[0])
        if size != draft.vocab_size:
            raise ValueError(
                f"--target {name} has a vocabulary of {size} ids and --draft {args.draft} of "
                f"{draft.vocab_size}: a draft serves targets that share its tokenizer"
            )
        compute.apply_kernels(target, kernels)
    compute.apply_kernels(draft.hf_model, kernels)
    return tokenizer, targets, draft


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def draft_run_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of a speculative run shared by demo and generate."""
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help="new tokens per prompt (demo: 40, generate: 64)",
    )
    parser.add_argument("--num-draft-tokens", type=positive_int, default=5, help="draft tokens per step (5)")
    parser.add_argument(
        "--draft-length",
        choices=("fixed", "heuristic", "confidence"),
        default="heuristic",
        help="draft-length policy (heuristic)",
    )
    parser.add_argument(
        "--thresholds",
        type=float_list,
        default=None,
        help="exit thresholds, one per draft exit (default: the draft's own)",
    )
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        help="sampling temperature (0 = greedy, the default; greedy outputs are compared)",
    )
    parser.add_argument("--top-k", type=non_negative_int, default=0)
    parser.add_argument("--top-p", type=positive_float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="Philox seed of sampled runs (0)")
