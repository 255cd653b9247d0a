"""Verification by speculative sampling, in plain PyTorch: the spec every backend must match.

Vocabulary (as in vLLM's rejection sampler)
-------------------------------------------
accepted
    A draft token kept by the test. Greedy rows accept a draft token iff it equals the target's
    argmax; sampled rows accept draft token ``x`` with probability ``min(1, p(x) / q(x))``
    (Leviathan et al. 2023; Chen et al. 2023), implemented as ``u * q(x) < p(x)`` so it never
    divides and never accepts a token with ``p(x) = 0``.
recovered
    The token emitted at the first rejected position: the target argmax (greedy) or a sample
    from ``norm(max(0, p - q))`` (sampled). With ``draft_probs=None`` the draft is a point mass,
    so the residual is ``p`` with the draft token removed.
bonus
    The token emitted when every valid draft was accepted: the argmax of (greedy) or a sample
    from (sampled) the target distribution at position ``num_draft``.

Each row emits ``num_accepted`` drafts, then exactly one recovered or bonus token.

Target processing (transformers' order): ``scores = logits / temperature``; top-k keeps scores
``>=`` the k-th largest; top-p then keeps the tokens whose more-probable tokens hold less than
``top_p`` of the (top-k renormalised) mass, ties kept together. Both are expressed as one
per-position threshold ``min_logit`` on the scaled scores, computed by :func:`logit_threshold`.

Non-finite logits (a defined behaviour, identical on every backend)
    NaN counts as ``-inf``; ``+inf`` counts as the largest finite float32. A position whose scores
    are all ``-inf`` is treated as uniform. Greedy ties go to the smallest token id.

Randomness: Philox (see :mod:`s2d_ext.ops.philox`). The accept uniform of position ``j`` is
``philox_uniform(seed, offset, STREAM_ACCEPT, j, 0)``. Sampling draws from ``r / sum(r)`` without
normalising ``r`` and without a prefix scan, by a two-level exponential race (:func:`exponential_race`):
first a block of ``RACE_BLOCK`` consecutive ids, ``argmax_b R_b / E_b`` over the block sums ``R_b``,
then an id inside it, ``argmax_v r_v / E_v``, where ``E = -log(u)`` and the uniforms come from
streams ``STREAM_SAMPLE | STREAM_BLOCK_FLAG`` (index b) and ``STREAM_SAMPLE`` (index v). When the
residual is all zero (``p == q`` up to rounding) the race runs on ``p`` instead.

Out-of-contract values reaching the op directly (``torch.ops.s2d.verify``) stay safe: ``num_draft``
is clamped to ``0..K`` and a draft token outside ``[0, V)`` is rejected, never used as an index.
"""

from __future__ import annotations

import torch

# NOTE: the target processing lives in logit_filters, which the wrappers run for every backend; the spec
# re-exports it so that it still reads as one definition.
from s2d_ext.ops.logit_filters import FLOAT32_MAX, logit_threshold, sanitize, scaled_scores  # noqa: F401
from s2d_ext.ops.philox import STREAM_ACCEPT, STREAM_BLOCK_FLAG, STREAM_SAMPLE, philox_uniform

RACE_MAX_UNIFORM = 1.0 - 2.0**-24  # the largest float32 below 1
RACE_BLOCK = 64  # ids per block of the race's first stage


def processed_probs(
    logits: torch.Tensor,  # [B, P, V]
    temperature: torch.Tensor,  # [B]
    min_logit: torch.Tensor | None,  # [B, P] or None
) -> torch.Tensor:
    """The target distribution p [B, P, V] float32 after temperature, top-k and top-p."""
    scores = scaled_scores(logits, temperature)
    if min_logit is not None:
        scores = scores.masked_fill(scores < min_logit[..., None], float("-inf"))
    return torch.softmax(scores, dim=-1)


def exponential_race(
    weights: torch.Tensor,  # [B, V] float32, unnormalised, >= 0
    seeds: torch.Tensor,  # [B] int64
    offsets: torch.Tensor,  # [B] int64
    positions: torch.Tensor,  # [B] int64, the draft position being decided
    stream: int = STREAM_SAMPLE,
) -> torch.Tensor:
    """Sample one index per row from ``weights / weights.sum()`` by a two-level exponential race.

    Stage 1 picks a block of ``RACE_BLOCK`` consecutive ids (the last one may be shorter):
    ``b = argmax_b R_b / E_b`` with ``R_b`` the sum of the block's weights. Stage 2 picks an id in
    that block: ``v = argmax_v w_v / E_v``. Ties go to the smallest block and id. Each stage is an
    exponential race, so ``P(b) = R_b / sum(R)`` and ``P(v | b) = w_v / R_b``: the product is
    exactly ``w_v / sum(w)``. The two stages draw independent uniforms (stream
    ``stream | STREAM_BLOCK_FLAG`` at index b, then ``stream`` at index v), so a backend needs
    ``V / RACE_BLOCK + RACE_BLOCK`` random numbers per row instead of V.

    ``E = -log(min(u, RACE_MAX_UNIFORM))``: ``philox_uniform`` returns exactly 1.0 with
    probability 2**-24 (``(2**24 - 1) + 0.5`` rounds up in float32), and ``E = 0`` would give that
    entry an infinite key, or NaN (which wins ``argmax``) where its weight is 0. Clamping to the
    largest float below 1 keeps ``E > 0`` and is statistically exact (``P(E < 2**-24) ~ 2**-24``).
    The block sums are float32; backends may add them in another order (ulp-level differences).
    """
    batch, vocab = weights.shape
    num_blocks = -(-vocab // RACE_BLOCK)
    padded = torch.nn.functional.pad(weights.float(), (0, num_blocks * RACE_BLOCK - vocab))
    block_sums = padded.view(batch, num_blocks, RACE_BLOCK).sum(dim=-1)  # [B, num_blocks]
    block_ids = torch.arange(num_blocks, device=weights.device)[None, :]
    u_block = philox_uniform(
        seeds[:, None], offsets[:, None], stream | STREAM_BLOCK_FLAG, positions[:, None], block_ids
    )
    block = (block_sums / -torch.log(u_block.clamp(max=RACE_MAX_UNIFORM))).argmax(dim=-1)  # [B]
    index = block[:, None] * RACE_BLOCK + torch.arange(RACE_BLOCK, device=weights.device)[None, :]
    u = philox_uniform(seeds[:, None], offsets[:, None], stream, positions[:, None], index)
    key = padded.gather(-1, index) / -torch.log(u.clamp(max=RACE_MAX_UNIFORM))  # [B, RACE_BLOCK]
    key = key.masked_fill(index >= vocab, float("-inf"))
    return index.gather(-1, key.argmax(dim=-1, keepdim=True)).squeeze(-1)


def verify_reference(
    target_logits: torch.Tensor,  # [B, K+1, V] float32 / bfloat16 / float16
    draft_tokens: torch.Tensor,  # [B, K] int64
    draft_probs: torch.Tensor | None,  # [B, K, V] float32, or None for argmax drafts
    num_draft: torch.Tensor,  # [B] int64, 0..K
    temperature: torch.Tensor,  # [B] float32, 0 = greedy row
    min_logit: torch.Tensor | None,  # [B, K+1] float32 (top-k/top-p threshold), or None
    seeds: torch.Tensor,  # [B] int64
    offsets: torch.Tensor,  # [B] int64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``out_tokens`` [B, K+1] int64 (accepted drafts, one emitted token, then -1) and
    ``num_accepted`` [B] int32. Arguments are already validated and normalised."""
    batch, k_plus_1, vocab = target_logits.shape
    num_spec = k_plus_1 - 1
    device = target_logits.device
    rows = torch.arange(batch, device=device)
    greedy = temperature <= 0  # [B]
    num_draft = num_draft.clamp(0, num_spec)

    target_argmax = sanitize(target_logits).argmax(dim=-1)  # [B, K+1]
    p = processed_probs(target_logits, temperature, min_logit)  # [B, K+1, V]

    valid_token = (draft_tokens >= 0) & (draft_tokens < vocab)  # [B, K]
    safe_tokens = torch.where(valid_token, draft_tokens, torch.zeros_like(draft_tokens))
    p_draft = p[:, :num_spec].gather(-1, safe_tokens[..., None]).squeeze(-1)  # [B, K]
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.float().gather(-1, safe_tokens[..., None]).squeeze(-1)
    position = torch.arange(num_spec, device=device)
    u = philox_uniform(seeds[:, None], offsets[:, None], STREAM_ACCEPT, position[None, :], 0)  # [B, K]
    accept_sampled = valid_token & (u * q_draft < p_draft)
    accept_greedy = draft_tokens == target_argmax[:, :num_spec]
    accept = torch.where(greedy[:, None], accept_greedy, accept_sampled)
    accept &= position[None, :] < num_draft[:, None]
    num_accepted = accept.to(torch.int64).cumprod(dim=-1).sum(dim=-1)  # [B]

    # The emitted token: recovered (num_accepted < num_draft) or bonus (== num_draft).
    p_emit = p[rows, num_accepted]  # [B, V]
    recovered = num_accepted < num_draft
    draft_pos = num_accepted.clamp(max=max(num_spec - 1, 0))  # only read where recovered
    if num_spec == 0:
        residual = p_emit
    elif draft_probs is None:
        # q is a point mass on the draft token: the residual is p with that token removed.
        x = safe_tokens[rows, draft_pos]
        drop = valid_token[rows, draft_pos]
        residual = p_emit.clone()
        residual[rows, x] = torch.where(drop, torch.zeros_like(p_emit[rows, x]), p_emit[rows, x])
    else:
        diff = p_emit - draft_probs.float()[rows, draft_pos]
        residual = torch.where(diff > 0, diff, torch.zeros_like(diff))
    weights = torch.where(recovered[:, None], residual, p_emit)
    weights = torch.where(weights.amax(dim=-1, keepdim=True) > 0, weights, p_emit)
    sampled_token = exponential_race(weights, seeds, offsets, num_accepted)
    emitted = torch.where(greedy, target_argmax[rows, num_accepted], sampled_token)

    out_tokens = torch.full((batch, k_plus_1), -1, dtype=torch.int64, device=device)
    keep = position[None, :] < num_accepted[:, None]
    out_tokens[:, :num_spec] = torch.where(keep, draft_tokens, out_tokens[:, :num_spec])
    out_tokens[rows, num_accepted] = emitted
    return out_tokens, num_accepted.to(torch.int32)
