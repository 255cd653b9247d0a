"""verify: every backend against the reference, the sampling law, bad inputs, compile/opcheck.

Triton runs in the interpreter on CPU (slow), so its cases are few and small.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from python_tests.conftest import DEVICES, backends_for
from s2d_ext import _native
from s2d_ext.ops import verify
from s2d_ext.ops.verify_reference import logit_threshold, processed_probs, verify_reference

CPP_BACKENDS = [(d, b) for d in DEVICES for b in backends_for("verify", d) if b != "triton"]
TRITON_BACKENDS = [(d, b) for d in DEVICES for b in backends_for("verify", d) if b == "triton"]
ALL_BACKENDS = CPP_BACKENDS + TRITON_BACKENDS
needs_native = pytest.mark.skipif(not _native.has_native("verify"), reason="C++ verify library not built")


def make_inputs(batch, num_spec, vocab, *, dtype=torch.float32, device="cpu", seed=0, spread=3.0, noise=0.5):
    """Target logits and a nearby draft distribution q (so acceptance is non-trivial)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_spec + 1, vocab, generator=generator) * spread
    draft_logits = logits[:, :num_spec] + torch.randn(batch, num_spec, vocab, generator=generator) * noise
    draft_probs = torch.softmax(draft_logits, dim=-1)
    tokens = torch.multinomial(draft_probs.reshape(-1, vocab), 1, generator=generator).reshape(
        batch, num_spec
    )
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=generator)
    return logits.to(dtype).to(device), tokens.to(device), draft_probs.to(device), seeds.to(device)


def assert_same(backend, args, kwargs):
    expected = verify(*args, backend="reference", **kwargs)
    got = verify(*args, backend=backend, **kwargs)
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.int32
    torch.testing.assert_close(got[0].cpu(), expected[0].cpu(), rtol=0, atol=0)
    torch.testing.assert_close(got[1].cpu(), expected[1].cpu(), rtol=0, atol=0)
    return got


# ---------------------------------------------------------------------------------------------
# Backends against the reference (same seeds -> same tokens)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "backend"), CPP_BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "vocab"),
    [
        (torch.float32, 37),
        (torch.bfloat16, 37),
        (torch.float16, 37),
        (torch.float32, 1000),
        (torch.bfloat16, 1000),
        (torch.float16, 1000),
        (torch.bfloat16, 32003),
    ],
)
@pytest.mark.parametrize("with_q", [True, False])
def test_matches_reference(device, backend, dtype, vocab, with_q):
    batch, num_spec = (24, 5) if vocab < 10_000 else (6, 2)
    logits, tokens, q, seeds = make_inputs(batch, num_spec, vocab, dtype=dtype, device=device, seed=vocab)
    if not with_q:  # argmax drafting: the draft token is q's argmax
        tokens = q.argmax(-1)
    generator = torch.Generator().manual_seed(1)
    num_draft = torch.randint(0, num_spec + 1, (batch,), generator=generator).to(device)
    temperature = torch.where(
        torch.rand(batch, generator=generator) < 0.3, 0.0, 0.5 + torch.rand(batch, generator=generator)
    )
    temperature[::4] = 1.0
    for top_k, top_p in [(0, 1.0), (5, 1.0), (0, 0.8), (20, 0.9)]:
        got = assert_same(
            backend,
            (
                logits,
                tokens,
                q if with_q else None,
                num_draft,
                temperature.to(device),
                top_k,
                top_p,
                seeds,
                3,
            ),
            {},
        )
        assert bool((got[1].cpu() <= num_draft.cpu()).all())


@pytest.mark.parametrize(("device", "backend"), TRITON_BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "vocab", "with_q", "top_k", "top_p"),
    [
        (torch.float32, 37, True, 0, 1.0),
        (torch.bfloat16, 1000, False, 10, 0.9),
        (torch.float16, 300, True, 0, 0.8),
    ],
)
def test_triton_matches_reference(device, backend, dtype, vocab, with_q, top_k, top_p):
    batch, num_spec = 6, 3
    logits, tokens, q, seeds = make_inputs(batch, num_spec, vocab, dtype=dtype, device=device, seed=vocab)
    num_draft = torch.tensor([0, 1, 2, 3, 3, 2], device=device)
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.0, 0.0, 1.3], device=device)
    assert_same(
        backend, (logits, tokens, q if with_q else None, num_draft, temperature, top_k, top_p, seeds, 5), {}
    )


@pytest.mark.parametrize(("device", "backend"), ALL_BACKENDS)
def test_greedy_exact_and_ties_go_to_smallest_id(device, backend):
    vocab = 37
    logits = torch.zeros(3, 3, vocab)
    logits[:, :, [4, 9, 30]] = 5.0  # a three-way tie at every position
    tokens = torch.tensor([[4, 4], [4, 9], [9, 4]])
    out, accepted = verify(logits.to(device), tokens.to(device), backend=backend)
    assert accepted.cpu().tolist() == [2, 1, 0]
    assert out.cpu().tolist() == [[4, 4, 4], [4, 4, -1], [4, -1, -1]]


@pytest.mark.parametrize(("device", "backend"), ALL_BACKENDS + [("cpu", "reference")])
def test_all_accepted_emits_bonus_and_pads(device, backend):
    logits = torch.full((2, 4, 11), -5.0)
    for j, t in enumerate([3, 7, 1, 8]):
        logits[:, j, t] = 5.0
    tokens = torch.tensor([[3, 7, 1], [3, 7, 1]])
    out, accepted = verify(
        logits.to(device), tokens.to(device), num_draft=torch.tensor([3, 1]).to(device), backend=backend
    )
    assert accepted.cpu().tolist() == [3, 1]
    assert out.cpu().tolist() == [[3, 7, 1, 8], [3, 7, -1, -1]]


@pytest.mark.parametrize(("device", "backend"), CPP_BACKENDS)
@pytest.mark.parametrize("layout", ["flat", "rising", "peaked", "jump"])
def test_race_on_chunked_exps_is_exact(device, backend, layout):
    """Regression for the C++ race: it reads p from pass 1's exps, kept relative to each chunk's
    running max, and sums them per race block. Many rows, a vocabulary of three 2048-entry chunks
    plus a partial race block, and layouts where the max arrives late ("rising", so every chunk is
    rescaled), p is nearly a point mass ("peaked"), or the last chunk's max jumps by more than the
    cheap accept pass's headroom over the earlier ones ("jump": that pass redoes the chunk)."""
    batch, num_spec, vocab = 192, 3, 2 * 2048 + 100 + 3
    spread = {"flat": 0.3, "rising": 1.0, "peaked": 6.0, "jump": 1.0}[layout]
    logits, tokens, q, seeds = make_inputs(batch, num_spec, vocab, device=device, seed=11, spread=spread)
    if layout == "rising":
        logits = logits + torch.linspace(0.0, 8.0, vocab, device=device)
    if layout == "jump":
        logits[..., -40:] += 100.0
        # The draft follows the jump too, so that the accept tests are close calls, not certain rejects.
        gen = torch.Generator().manual_seed(12)
        noise = torch.randn(batch, num_spec, vocab, generator=gen).to(device) * 0.3
        q = torch.softmax(logits[:, :num_spec] + noise, dim=-1)
        tokens = torch.multinomial(q.reshape(-1, vocab).cpu(), 1, generator=gen).reshape(batch, num_spec)
        tokens = tokens.to(device)
    generator = torch.Generator().manual_seed(2)
    num_draft = torch.randint(0, num_spec + 1, (batch,), generator=generator).to(device)
    temperature = torch.where(torch.arange(batch) % 3 == 0, 1.0, 0.7).to(device)
    for draft_probs, top_k in [(q, 0), (None, 0), (q, 50)]:
        assert_same(backend, (logits, tokens, draft_probs, num_draft, temperature, top_k, 1.0, seeds, 9), {})


@pytest.mark.parametrize(("device", "backend"), CPP_BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "temperature", "top_k"), [(torch.float32, 1.0, 0), (torch.bfloat16, 0.7, 40)]
)
def test_accept_boundary_is_decided_exactly(device, backend, dtype, temperature, top_k):
    """Regression for the C++ kernel's cheap accept test: it settles u * q(x) < p(x) from a sum of
    approximate exps (a few percent off) and runs the exact pass only when the verdict is unsure.
    Here q(x) is set so that u * q(x) = p(x) (1 + eps), with eps from just inside the cheap pass's
    error (+-1e-3 .. +-6%) to just outside it: every verdict must match the reference's."""
    from s2d_ext.ops.philox import STREAM_ACCEPT, philox_uniform

    eps = torch.tensor([-0.07, -0.0615, -0.03, -1e-2, -1e-3, 1e-3, 1e-2, 0.03, 0.0615, 0.07])
    batch, num_spec, vocab = 2 * len(eps), 3, 2 * 2048 + 905
    logits, _, q, seeds = make_inputs(batch, num_spec, vocab, dtype=dtype, seed=5, spread=2.0)
    logits, q, seeds = logits.cpu(), q.cpu(), seeds.cpu()
    temperature_t = torch.full((batch,), temperature)
    min_logit = None
    if top_k:
        min_logit = logit_threshold(logits, temperature_t, torch.full((batch,), top_k), torch.ones(batch))
    p = processed_probs(logits, temperature_t, min_logit)[:, :num_spec]  # [B, K, V]
    tokens = p.argsort(dim=-1, descending=True)[..., 1]  # a likely token, not the max
    u = philox_uniform(
        seeds[:, None],
        torch.zeros(batch, 1, dtype=torch.int64),
        STREAM_ACCEPT,
        torch.arange(num_spec)[None, :],
        0,
    )
    # Row b tests eps[b % 10] at every position; odd rows accept the first positions outright.
    row_eps = eps.repeat(2)[:, None].expand(batch, num_spec).clone()
    row_eps[len(eps) :, :2] = -0.5
    p_token = p.gather(-1, tokens[..., None]).squeeze(-1)
    q.scatter_(-1, tokens[..., None], (p_token / u * (1 + row_eps))[..., None])
    args = (
        logits.to(device),
        tokens.to(device),
        q.to(device),
        None,
        temperature,
        top_k,
        1.0,
        seeds.to(device),
        0,
    )
    got = assert_same(backend, args, {})
    # Both verdicts occur (the reference's own decision is u q < p, so eps < 0 accepts).
    assert got[1].min() == 0 and got[1].max() == num_spec


@pytest.mark.parametrize(("device", "backend"), CPP_BACKENDS)
def test_vocabulary_beyond_the_cheap_pass_limit(device, backend):
    """The C++ kernel's cheap accept pass is certified only up to V = 2**20 (the exact pass's
    rounding grows with V); beyond it every position runs exactly. One vocabulary past the limit."""
    batch, num_spec, vocab = 2, 2, 2**20 + 37
    logits, tokens, q, seeds = make_inputs(batch, num_spec, vocab, device=device, seed=13, spread=1.0)
    temperature = torch.tensor([1.0, 0.8], device=device)
    for draft_probs in (q, None):
        assert_same(backend, (logits, tokens, draft_probs, None, temperature, 0, 1.0, seeds, 3), {})


@needs_native
def test_portable_cpu_build_matches_reference():
    """The non-AVX2 build of the C++ kernel (forced by S2D_VERIFY_PORTABLE=1) in a fresh process."""
    code = (
        "import torch\n"
        "from python_tests.ops.test_verify import make_inputs, assert_same\n"
        "l, t, q, s = make_inputs(16, 4, 1003, dtype=torch.bfloat16, seed=3)\n"
        "temp = torch.tensor([0.0, 1.0, 0.8, 1.2] * 4)\n"
        "assert_same('cpu', (l, t, q, None, temp, 7, 0.9, s, 1), {})\n"
        "assert_same('cpu', (l, t, None, None, temp, 0, 1.0, s, 1), {})\n"
    )
    env = dict(os.environ, S2D_VERIFY_PORTABLE="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# The sampling law: emitted tokens follow the processed target distribution
# ---------------------------------------------------------------------------------------------

DIST_BACKENDS = ["reference"] + [b for d, b in CPP_BACKENDS if d == "cpu"]


def _chi_square_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    from scipy import stats

    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() / probs.double().sum() * samples.numel()
    keep = expected > 0
    assert counts[~keep].sum() == 0, f"sampled a token of zero target probability: {counts[~keep]}"
    # Merge tiny bins so the chi-square approximation holds.
    small = keep & (expected < 5)
    observed = torch.cat([counts[keep & ~small], counts[small].sum().reshape(1)])
    wanted = torch.cat([expected[keep & ~small], expected[small].sum().reshape(1)])
    if wanted[-1] == 0:
        observed, wanted = observed[:-1], wanted[:-1]
    return float(stats.chisquare(observed.numpy(), wanted.numpy()).pvalue)


@pytest.mark.parametrize("backend", DIST_BACKENDS)
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "with_q"),
    [
        (1.0, 0, 1.0, True),
        (0.6, 0, 1.0, True),
        (1.0, 4, 1.0, True),
        (1.3, 0, 0.7, True),
        (0.8, 5, 0.9, False),
        (1.0, 0, 1.0, False),
    ],
)
def test_emitted_tokens_follow_target(backend, temperature, top_k, top_p, with_q):
    """K=1, one fixed (p, q) pair on V=11 repeated over 120k rows: out[:, 0] ~ p at position 0
    (accepted draft or recovered token) and, where the draft was accepted, out[:, 1] ~ p at the
    bonus position."""
    rows, vocab = 120_000, 11
    generator = torch.Generator().manual_seed(7)
    logits = (torch.randn(1, 2, vocab, generator=generator) * 1.5).expand(rows, 2, vocab).contiguous()
    q_row = torch.softmax(torch.randn(vocab, generator=generator) * 1.5, dim=-1)
    if with_q:
        q = q_row.expand(rows, 1, vocab).contiguous()
        tokens = torch.multinomial(q_row, rows, replacement=True, generator=generator).reshape(rows, 1)
    else:
        q = None  # argmax drafting: a draft that guessed the target's favourite token
        tokens = torch.full((rows, 1), int(logits[0, 0].argmax()))
    seeds = torch.randint(-(2**62), 2**62, (rows,), generator=generator)
    out, accepted = verify(logits, tokens, q, None, temperature, top_k, top_p, seeds, 0, backend=backend)
    t = torch.full((1,), float(temperature))
    threshold = logit_threshold(logits[:1], t, torch.full((1,), top_k), torch.full((1,), float(top_p)))
    p = processed_probs(logits[:1], t, threshold)[0]  # [2, V]
    assert _chi_square_pvalue(out[:, 0], p[0]) > 1e-4
    bonus = out[accepted == 1, 1]
    assert bonus.numel() > 1000
    assert _chi_square_pvalue(bonus, p[1]) > 1e-4


@pytest.mark.parametrize("backend", DIST_BACKENDS)
@pytest.mark.parametrize("with_q", [True, False])
def test_two_level_race_follows_target_across_blocks(backend, with_q):
    """The race draws a block of 64 ids by its mass, then an id inside it: over a vocabulary of
    three full blocks and a short tail block (V=200), with most mass in one block and some in the
    tail, recovered and bonus tokens still follow p exactly."""
    rows, vocab = 60_000, 200
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 2, vocab, generator=generator)
    logits[..., 64:128] += 2.0  # block 1 holds most of the mass
    logits[..., 192:] += 1.0  # the short tail block some
    logits = logits.expand(rows, 2, vocab).contiguous()
    q_row = torch.softmax(torch.randn(vocab, generator=generator) * 2.0, dim=-1)
    if with_q:
        q = q_row.expand(rows, 1, vocab).contiguous()
        tokens = torch.multinomial(q_row, rows, replacement=True, generator=generator).reshape(rows, 1)
    else:
        q = None
        tokens = torch.full((rows, 1), int(logits[0, 0].argmax()))
    seeds = torch.randint(-(2**62), 2**62, (rows,), generator=generator)
    out, accepted = verify(logits, tokens, q, None, 1.0, 0, 1.0, seeds, 0, backend=backend)
    p = torch.softmax(logits[0], dim=-1)  # [2, V]
    assert _chi_square_pvalue(out[:, 0], p[0]) > 1e-4
    bonus = out[accepted == 1, 1]
    assert bonus.numel() > 1000
    assert _chi_square_pvalue(bonus, p[1]) > 1e-4


@pytest.mark.parametrize("backend", DIST_BACKENDS)
def test_greedy_rows_in_a_sampled_batch(backend):
    """Mixed batch: greedy rows are deterministic, sampled rows still follow p."""
    rows, vocab = 60_000, 7
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 2, vocab, generator=generator).expand(rows, 2, vocab).contiguous()
    tokens = torch.randint(0, vocab, (rows, 1), generator=generator)
    temperature = torch.where(torch.arange(rows) % 2 == 0, 0.0, 1.0)
    seeds = torch.randint(-(2**62), 2**62, (rows,), generator=generator)
    out, accepted = verify(logits, tokens, None, None, temperature, 0, 1.0, seeds, 0, backend=backend)
    greedy_first = torch.where(tokens[::2, 0] == logits[0, 0].argmax(), tokens[::2, 0], logits[0, 0].argmax())
    assert torch.equal(out[::2, 0], greedy_first)
    p = torch.softmax(logits[0, 0], -1)
    assert _chi_square_pvalue(out[1::2, 0], p) > 1e-4


def test_top_p_one_keeps_every_top_k_token():
    """Regression: with top_p == 1 only top-k applies, even where float cumsum reaches 1 early."""
    logits = torch.tensor([[[30.0, 10.0, 0.0, -1.0, -2.0, -3.0]]])
    threshold = logit_threshold(logits, torch.ones(1), torch.tensor([5]), torch.ones(1))
    assert threshold.item() == -2.0


# ---------------------------------------------------------------------------------------------
# Batch invariance, reproducibility, non-finite logits, out-of-range tokens
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "backend"), ALL_BACKENDS)
def test_batch_invariance(device, backend):
    batch = 8 if backend == "triton" else 32
    logits, tokens, q, seeds = make_inputs(batch, 3, 129, device=device, seed=11)
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.5] * (batch // 4), device=device)
    offsets = torch.arange(batch, device=device) * 1000
    full = verify(logits, tokens, q, None, temperature, 0, 0.95, seeds, offsets, backend=backend)
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(0)).to(device)[: batch // 2]
    part = verify(
        logits[perm],
        tokens[perm],
        q[perm],
        None,
        temperature[perm],
        0,
        0.95,
        seeds[perm],
        offsets[perm],
        backend=backend,
    )
    assert torch.equal(part[0], full[0][perm]) and torch.equal(part[1], full[1][perm])
    again = verify(logits, tokens, q, None, temperature, 0, 0.95, seeds, offsets, backend=backend)
    assert torch.equal(again[0], full[0])


@pytest.mark.parametrize(("device", "backend"), ALL_BACKENDS + [("cpu", "reference")])
def test_non_finite_logits_stay_in_range(device, backend):
    """NaN / inf logits (vLLM CVE-style): defined results, never an id outside [0, V)."""
    vocab, num_spec = 37, 3
    logits, tokens, q, seeds = make_inputs(8, num_spec, vocab, seed=5)
    logits[0] = float("nan")  # all NaN -> uniform
    logits[1] = float("-inf")  # all -inf -> uniform
    logits[2, :, 5] = float("inf")  # +inf -> float32 max -> certain
    logits[3, :, ::2] = float("nan")
    logits[4, 1] = float("-inf")
    logits[5, :, 3] = float("nan")
    tokens[5] = 3
    temperature = torch.tensor([1.0, 0.7, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0])
    for draft_probs in (q, None):
        args = (
            logits.to(device),
            tokens.to(device),
            None if draft_probs is None else draft_probs.to(device),
            None,
            temperature.to(device),
            3,
            0.9,
            seeds.to(device),
            0,
        )
        out, accepted = verify(*args, backend=backend)
        emitted = out.cpu().gather(1, accepted.cpu().long()[:, None])
        assert bool(((emitted >= 0) & (emitted < vocab)).all())
        assert out.cpu()[2, accepted[2].item()].item() == 5
        assert not bool((out.cpu()[5, : accepted[5].item()] == 3).any())  # NaN token is never accepted
        if backend != "reference":
            assert_same(backend, args, {})


@pytest.mark.parametrize(("device", "backend"), ALL_BACKENDS)
def test_out_of_range_draft_token_is_rejected_not_read(device, backend):
    """Straight to the op (the wrapper would refuse): bad ids are rejected, never used as indices."""
    from s2d_ext.ops.verify import _normalise

    vocab = 37
    logits, tokens, q, seeds = make_inputs(4, 2, vocab, seed=9, device=device)
    tokens[:, 0] = torch.tensor([-1, vocab, 2**40, -(2**40)])
    temperature = torch.tensor([0.0, 1.0, 0.9, 1.0], device=device)
    args = list(_normalise(logits, tokens.clamp(0, vocab - 1), q, None, temperature, 0, 1.0, seeds, 0, None))
    args[1] = tokens
    expected = verify_reference(*args)
    if backend == "triton":
        import s2d_ext.triton.verify  # noqa: F401  (registers the op, before the lookup below)
    op = torch.ops.s2d.verify_triton if backend == "triton" else torch.ops.s2d.verify
    out, accepted = op(*args)
    assert accepted.cpu().tolist() == [0, 0, 0, 0]
    assert torch.equal(out.cpu(), expected[0].cpu())
    assert bool(((out[:, 0] >= 0) & (out[:, 0] < vocab)).all())


# ---------------------------------------------------------------------------------------------
# Bad input, B = 0, backend choice
# ---------------------------------------------------------------------------------------------


def _good():
    logits, tokens, q, seeds = make_inputs(3, 2, 17, seed=1)
    return {"target_logits": logits, "draft_tokens": tokens, "draft_probs": q, "seeds": seeds}


@pytest.mark.parametrize(
    ("change", "error", "name"),
    [
        ({"target_logits": torch.zeros(3, 17)}, ValueError, "target_logits"),
        ({"target_logits": torch.zeros(3, 3, 17, dtype=torch.float64)}, TypeError, "target_logits"),
        ({"target_logits": [[0.0]]}, TypeError, "target_logits"),
        ({"target_logits": torch.zeros(3, 3, 0)}, ValueError, "target_logits"),
        ({"draft_tokens": torch.zeros(3, 2, dtype=torch.int32)}, TypeError, "draft_tokens"),
        ({"draft_tokens": torch.zeros(3, 3, dtype=torch.int64)}, ValueError, "K mismatch"),
        ({"draft_tokens": torch.zeros(2, 2, dtype=torch.int64)}, ValueError, "draft_tokens"),
        ({"draft_tokens": torch.zeros(3, 2, dtype=torch.int64, device="meta")}, ValueError, "draft_tokens"),
        ({"draft_tokens": torch.full((3, 2), 17)}, ValueError, "draft_tokens"),
        ({"draft_tokens": torch.full((3, 2), -1)}, ValueError, "draft_tokens"),
        ({"draft_probs": torch.zeros(3, 2, 16)}, ValueError, "draft_probs"),
        ({"draft_probs": torch.zeros(3, 2, 17, dtype=torch.float16)}, TypeError, "draft_probs"),
        ({"draft_probs": torch.zeros(3, 2)}, ValueError, "draft_probs"),
        ({"num_draft": 3}, ValueError, "num_draft"),
        ({"num_draft": -1}, ValueError, "num_draft"),
        ({"num_draft": torch.tensor([0, 1])}, ValueError, "num_draft"),
        ({"num_draft": torch.tensor([0.0, 1.0, 2.0])}, TypeError, "num_draft"),
        ({"temperature": -0.5}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"temperature": "hot"}, TypeError, "temperature"),
        ({"temperature": 1e-40}, ValueError, "temperature"),  # overflows logits / T (garbage tokens)
        ({"temperature": torch.tensor([0.0, 1.0, 1e-7])}, ValueError, "temperature"),
        ({"top_k": -1}, ValueError, "top_k"),
        ({"top_k": 2.5}, TypeError, "top_k"),
        ({"top_p": 0.0}, ValueError, "top_p"),
        ({"top_p": 1.5}, ValueError, "top_p"),
        ({"top_p": torch.tensor([0.5, 1.0, 1.1])}, ValueError, "top_p"),
        ({"seeds": torch.zeros(2, dtype=torch.int64)}, ValueError, "seeds"),
        ({"seeds": 1.5}, TypeError, "seeds"),
        ({"seeds": 2**64}, ValueError, "seeds"),  # was an OverflowError naming nothing
        ({"temperature": torch.tensor([True, False, True])}, TypeError, "temperature"),  # was accepted
        ({"num_draft": torch.tensor([True, False, True])}, TypeError, "num_draft"),
        ({"offsets": torch.zeros(3, 1, dtype=torch.int64)}, ValueError, "offsets"),
    ],
)
def test_bad_input_names_the_argument(change, error, name):
    kwargs = {**_good(), **change}
    with pytest.raises(error, match=name):
        verify(**kwargs, backend="reference")


def test_padding_beyond_num_draft_is_not_checked():
    """Draft protocol: entries j >= num_draft are padding (any value) and are ignored."""
    kwargs = _good()
    kwargs["draft_tokens"][:, 1] = -1
    out, accepted = verify(**kwargs, num_draft=1, backend="reference")
    assert bool((accepted <= 1).all())


def test_backend_choice():
    kwargs = _good()
    with pytest.raises(ValueError, match="backend"):
        verify(**kwargs, backend="tpu")
    with pytest.raises(RuntimeError, match="not available"):
        verify(**kwargs, backend="cuda")


@pytest.mark.parametrize(("device", "backend"), ALL_BACKENDS + [("cpu", "reference")])
def test_empty_batch(device, backend):
    out, accepted = verify(
        torch.zeros(0, 4, 9, device=device),
        torch.zeros(0, 3, dtype=torch.int64, device=device),
        temperature=1.0,
        backend=backend,
    )
    assert out.shape == (0, 4) and accepted.shape == (0,)
    assert out.dtype == torch.int64 and accepted.dtype == torch.int32


@needs_native
def test_cpp_binding_checks_its_inputs():
    from s2d_ext.ops.verify import _normalise

    good = _good()
    args = list(_normalise(good["target_logits"], good["draft_tokens"], None, None, 1.0, 0, 1.0, 1, 0, None))
    bad = [
        (0, args[0][0]),  # 2-D logits
        (0, args[0].double()),
        (1, args[1][:, :1]),
        (1, args[1].int()),
        (2, torch.zeros(3, 2, 5)),
        (3, args[3][:2]),
        (4, args[4].double()),
        (5, torch.zeros(3, 2)),
        (6, args[6].float()),
        (7, args[7][:1]),
    ]
    for index, value in bad:
        broken = list(args)
        broken[index] = value
        with pytest.raises(RuntimeError, match="s2d::verify"):
            torch.ops.s2d.verify(*broken)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck, torch.compile
# ---------------------------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("with_optionals", [True, False])
def test_opcheck(with_optionals):
    from s2d_ext.ops.verify import _normalise

    logits, tokens, q, seeds = make_inputs(4, 3, 29, seed=2)
    args = _normalise(
        logits,
        tokens,
        q if with_optionals else None,
        None,
        torch.tensor([0.0, 1.0, 0.5, 2.0]),
        3 if with_optionals else 0,
        0.9 if with_optionals else 1.0,
        seeds,
        0,
        None,
    )
    torch.library.opcheck(torch.ops.s2d.verify.default, args)


@pytest.mark.parametrize(("device", "backend"), [("cpu", "reference")] + CPP_BACKENDS[:1])
def test_torch_compile(device, backend):
    """torch.compile (backend="aot_eager": inductor's C++ codegen is too slow on 2 CI cores)."""
    torch._dynamo.reset()
    logits, tokens, q, seeds = make_inputs(6, 3, 41, device=device, seed=4)
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.0, 0.0, 1.2], device=device)

    def step(logits, tokens, q, temperature, seeds):
        return verify(logits, tokens, q, None, temperature, 5, 0.9, seeds, 0, backend=backend)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(logits, tokens, q, temperature, seeds)
    expected = step(logits, tokens, q, temperature, seeds)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_meta_tensors_give_shapes_without_value_checks():
    # Regression: the value checks read meta tensors ("Tensor.item() cannot be called on meta tensors").
    meta = torch.device("meta")
    out, n_acc = verify(
        torch.zeros(2, 3, 17, device=meta),
        torch.zeros(2, 2, dtype=torch.int64, device=meta),
        None,
        temperature=torch.zeros(2, device=meta),
    )
    assert out.shape == (2, 3) and n_acc.shape == (2,) and out.device == meta
