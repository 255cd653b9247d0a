"""The reduced draft vocabulary (EAGLE-3's draft vocabulary, FR-Spec): the N most frequent target tokens.

A draft with a draft vocabulary scores only those N ids at every exit head (N rows of ``lm_head`` instead
of V), so a head costs N / V of a full one. Its q is zero outside the subset and a greedy draft token is
the argmax within the subset; verification is exact for any q, so the output stays lossless: a target
token outside the subset is simply never proposed, and verification emits it as the recovered or bonus
token.

On-disk format (other tools rely on it): a file ``draft_vocab.safetensors`` in the draft checkpoint's
folder holding one tensor named ``draft_vocab``, int64 [N], unique target token ids sorted ascending.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

DRAFT_VOCAB_FILE = "draft_vocab.safetensors"
TENSOR_NAME = "draft_vocab"


def most_frequent_tokens(
    token_ids_or_counts: torch.Tensor | Sequence[int] | Mapping[int, int | float],
    vocab_size: int,
    n: int,
) -> torch.Tensor:
    """The ``n`` most frequent token ids, as a draft vocabulary: int64 [n], unique, sorted ascending.

    Parameters
    ----------
    token_ids_or_counts : torch.Tensor, sequence of int or mapping
        Token ids (an integer tensor of any shape, e.g. SoFT's [n_blocks, seq_len] blocks, or a list of
        ids), or counts: a floating-point tensor [vocab_size] (``torch.bincount(ids).double()``) or a
        mapping id -> count. NOTE: an *integer* tensor is always read as ids, never as counts.
    vocab_size : int
        V, the target vocabulary; every id must be in [0, V).
    n : int
        How many ids to keep, 1 <= n <= V.

    Ties in frequency go to the smaller id, so the result is a pure function of the counts (ids never
    seen rank last, smallest first, if fewer than n ids occur).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= vocab_size:
        raise ValueError(f"n must be an int in [1, vocab_size={vocab_size}], got {n!r}")
    counts = _counts(token_ids_or_counts, vocab_size)
    # NOTE: a stable sort of the ids by descending count: equal counts keep ascending id order.
    order = torch.sort(-counts, stable=True).indices
    return order[:n].sort().values.to(torch.int64)


def _counts(value, vocab_size: int) -> torch.Tensor:
    """Counts [vocab_size] float64 from ids or counts (see most_frequent_tokens)."""
    if isinstance(value, Mapping):
        counts = torch.zeros(vocab_size, dtype=torch.float64)
        for token, count in value.items():
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise ValueError(f"token_ids_or_counts: the mapping's keys must be ids in [0, {vocab_size})")
            counts[token] = float(count)
        if bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
            raise ValueError("token_ids_or_counts: counts must be finite and >= 0")
        return counts
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(list(value), dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                "token_ids_or_counts must be a tensor of ids or counts, a sequence of ids or a mapping "
                f"id -> count, got {type(value).__name__}"
            ) from err
    value = value.detach().cpu()
    if value.dtype.is_floating_point:
        if value.dim() != 1 or value.shape[0] != vocab_size:
            raise ValueError(
                f"token_ids_or_counts: counts must be a [vocab_size={vocab_size}] tensor, "
                f"got shape {tuple(value.shape)}"
            )
        if bool((value < 0).any()) or not bool(torch.isfinite(value).all()):
            raise ValueError("token_ids_or_counts: counts must be finite and >= 0")
        return value.double()
    if value.dtype == torch.bool or value.dtype.is_complex:
        raise TypeError(f"token_ids_or_counts: ids must be an integer tensor, got {value.dtype}")
    ids = value.reshape(-1).to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token_ids_or_counts: token ids must be in [0, vocab_size={vocab_size})")
    return torch.bincount(ids, minlength=vocab_size).double()


def check_draft_vocab(
    vocab: object, vocab_size: int | None = None, *, name: str = "draft_vocab"
) -> torch.Tensor:
    """``vocab`` as int64 [N] unique ascending ids (in [0, vocab_size) when given), else a clear error."""
    if not isinstance(vocab, torch.Tensor):
        try:
            vocab = torch.as_tensor(list(vocab), dtype=torch.int64)  # type: ignore[arg-type]
        except (TypeError, ValueError, RuntimeError) as err:
            kind = type(vocab).__name__
            raise TypeError(f"{name} must be a tensor or sequence of token ids, got {kind}") from err
    if vocab.dtype.is_floating_point or vocab.dtype == torch.bool or vocab.dtype.is_complex:
        raise TypeError(f"{name} must hold integer token ids, got {vocab.dtype}")
    if vocab.dim() != 1 or vocab.numel() == 0:
        shape = tuple(vocab.shape)
        raise ValueError(f"{name} must be a non-empty 1-D tensor of token ids, got shape {shape}")
    vocab = vocab.to(torch.int64)
    if vocab.numel() > 1 and not bool((vocab[1:] > vocab[:-1]).all()):
        raise ValueError(f"{name} must hold unique token ids sorted ascending")
    if int(vocab[0]) < 0 or (vocab_size is not None and int(vocab[-1]) >= vocab_size):
        bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise ValueError(f"{name} must hold token ids in {bound}, got {int(vocab[0])}..{int(vocab[-1])}")
    return vocab


def save_draft_vocab(folder: str | os.PathLike, vocab: torch.Tensor | Sequence[int]) -> Path:
    """Write ``vocab`` to ``folder/draft_vocab.safetensors`` (tensor ``draft_vocab``); returns the file."""
    from safetensors.torch import save_file

    vocab = check_draft_vocab(vocab)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DRAFT_VOCAB_FILE
    tmp = folder / f".{DRAFT_VOCAB_FILE}.tmp-{os.getpid()}"
    save_file({TENSOR_NAME: vocab.detach().cpu().contiguous()}, str(tmp))
    os.replace(tmp, path)
    return path


def load_draft_vocab(folder: str | os.PathLike) -> torch.Tensor | None:
    """The draft vocabulary saved in ``folder`` (int64 [N], CPU), or None when it holds none."""
    from safetensors import safe_open

    path = Path(folder) / DRAFT_VOCAB_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        if TENSOR_NAME not in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
            raise ValueError(f"{path} holds no tensor named {TENSOR_NAME!r} (found {list(handle.keys())})")
        vocab = handle.get_tensor(TENSOR_NAME)
    return check_draft_vocab(vocab, name=str(path))
