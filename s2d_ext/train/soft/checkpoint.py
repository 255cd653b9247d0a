"""SoFT output folders: marking them, atomic saves (model + resume state + a readable record), resume."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from s2d_ext.train.soft.config import jsonable
from s2d_ext.train.soft.exits import has_tied_head, model_exits

#: File written beside the model in a SoFT output folder: marks it as ours and holds the resume state.
STATE_FILE = "soft_state.pt"
#: Human-readable record of the training configuration and history.
CONFIG_FILE = "soft_config.json"


def prepare_output_dir(out_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> bool:
    """Check ``out_dir`` before training; returns True when training should resume from it.

    An absent or empty folder is fine. A folder holding a SoFT checkpoint (``soft_state.pt``) is resumed with
    ``resume`` or replaced with ``overwrite``, else refused. A folder holding anything else is always refused.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {str(out)!r} is a file; refusing to overwrite it")
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise ValueError(f"cannot resume: output folder {str(out)!r} holds no SoFT checkpoint")
        return False
    if not (out / STATE_FILE).is_file():
        raise ValueError(
            f"output folder {str(out)!r} is not empty and holds no SoFT checkpoint; refusing to overwrite it "
            "(choose a new or empty folder)"
        )
    if resume:
        return True
    if overwrite:
        return False
    raise ValueError(
        f"output folder {str(out)!r} already holds a SoFT checkpoint; pass resume=True (--resume) to "
        "continue it or overwrite=True (--overwrite) to replace it"
    )


def save_checkpoint(
    model,
    out_dir,
    *,
    tokenizer=None,
    optimizer=None,
    step: int = 0,
    config=None,
    history=None,
    tokens_seen: int = 0,
    draft_vocab: torch.Tensor | None = None,
) -> Path:
    """Save ``model`` with ``save_pretrained`` (safetensors) plus the resume state, atomically: everything is
    written to a sibling temporary folder that then replaces ``out_dir``. ``draft_vocab`` (ids) is saved
    as ``draft_vocab.safetensors`` (:mod:`s2d_ext.draft.draft_vocab`)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if draft_vocab is not None:
            from s2d_ext.draft.draft_vocab import save_draft_vocab

            save_draft_vocab(tmp, draft_vocab)
        torch.save(
            {
                "step": step,
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "history": history or [],
                "tokens_seen": tokens_seen,
            },
            tmp / STATE_FILE,
        )
        record = {
            "step": step,
            "tokens_seen": tokens_seen,
            "exits": list(model_exits(model)),
            "config": jsonable(dataclasses.asdict(config)) if config is not None else None,
            "last": (history or [None])[-1],
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")

    return _write_folder_atomically(out_dir, write)


def load_resume_state(model, out_dir) -> dict:
    from safetensors.torch import load_file

    out = Path(out_dir)
    state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=False)
    weights = {}
    from s2d_ext.draft.draft_vocab import DRAFT_VOCAB_FILE

    for f in sorted(out.glob("*.safetensors")):
        if f.name != DRAFT_VOCAB_FILE:  # NOTE: the draft vocabulary sits beside the weights
            weights.update(load_file(f))
    if not weights:
        raise ValueError(f"cannot resume: no safetensors weights in {str(out)!r}")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [
        k for k in missing if "rotary_emb" not in k and not (k == "lm_head.weight" and has_tied_head(model))
    ]
    if missing or unexpected:
        raise ValueError(
            f"cannot resume from {str(out)!r}: its weights do not match the model (missing={missing[:3]}, "
            f"unexpected={unexpected[:3]})"
        )
    return state


def save_self_data_checkpoint(model, out_dir, *, save_fn, state: dict, record: dict) -> Path:
    """Like :func:`save_checkpoint` (atomic folder swap), with a custom ``save_fn(model, folder)``."""

    def write(tmp: Path) -> None:
        (save_fn or (lambda m, folder: m.save_pretrained(folder)))(model, tmp)
        torch.save(state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(jsonable(record), indent=2) + "\n")

    return _write_folder_atomically(out_dir, write)


def load_own_weights(model, out_dir) -> None:
    """Resume: load the weights saved in ``out_dir`` into ``model``; the shared (frozen) embedding and head
    may be absent from the file (a referencing checkpoint) and are then kept as they are."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    weights = {}
    for f in sorted(out.glob("*.safetensors")):
        if f.name != "draft_vocab.safetensors":
            weights.update(load_file(f))
    if not weights:
        raise ValueError(f"cannot resume: no safetensors weights in {str(out)!r}")
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [
        k
        for k in missing
        if "rotary_emb" not in k and k not in frozen and not (k == "lm_head.weight" and has_tied_head(model))
    ]
    if missing or unexpected:
        raise ValueError(
            f"cannot resume from {str(out)!r}: its weights do not match the model (missing={missing[:3]}, "
            f"unexpected={unexpected[:3]})"
        )


def read_training_record(out_dir: str | os.PathLike) -> dict:
    """The ``soft_config.json`` record of a SoFT output folder."""
    return json.loads((Path(out_dir) / CONFIG_FILE).read_text())


def _write_folder_atomically(out_dir, write) -> Path:
    """``write(tmp)`` fills a sibling temporary folder, which then replaces ``out_dir``.

    NOTE: a run killed mid-save leaves the previous checkpoint intact: the only non-atomic moment is between
    the two renames, and then the previous folder still exists under its ``.old-<pid>`` name."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    tmp.mkdir()
    write(tmp)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return out
