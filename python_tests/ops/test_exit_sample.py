"""exit_sample / sample_logits: every backend against the reference (the spec), the draw's distribution,
batch invariance, the reduced vocabulary, non-finite rows, opcheck and input checks."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from python_tests.conftest import DEVICES, backends_for
from s2d_ext.ops.exit_head_reference import exit_head_logits
from s2d_ext.ops.exit_sample import exit_sample, sample_logits
from s2d_ext.ops.verify_reference import logit_threshold, processed_probs

EPS = 1e-6
CASES = [(device, backend) for device in DEVICES for backend in backends_for("exit_head", device)]
SENTINEL = -7.0  # probs rows a call must not touch keep this value


def make_inputs(rows, dim, vocab, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=gen) * 3
    norm_weight = torch.rand(dim, generator=gen) + 0.5
    lm_head = torch.randn(vocab, dim, generator=gen) * (4 / math.sqrt(dim))
    return tuple(t.to(device=device, dtype=dtype) for t in (hidden, norm_weight, lm_head))


def row_settings(rows, device, seed=0):
    """Per-row sampling settings mixing greedy, plain, top-k, top-p and both, and thresholds that let some
    rows fire and others not."""
    gen = torch.Generator().manual_seed(seed)
    temperature = torch.tensor([0.0, 0.6, 1.0, 1.3, 2.0, 0.9, 0.0, 1.1])[torch.arange(rows) % 8]
    top_k = torch.tensor([0, 0, 7, 0, 40, 3, 5, 0])[torch.arange(rows) % 8]
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.8, 0.9, 0.6, 0.5, 1.0])[torch.arange(rows) % 8]
    threshold = torch.tensor([0.0, 0.0, 0.05, 0.0, 0.0, 0.99, 0.3, 0.0])[torch.arange(rows) % 8]
    seeds = torch.randint(-(2**62), 2**62, (rows,), generator=gen)
    offsets = torch.randint(0, 2**40, (rows,), generator=gen)
    positions = torch.randint(0, 2**16, (rows,), generator=gen)
    return {
        name: value.to(device)
        for name, value in dict(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seeds=seeds,
            offsets=offsets,
            positions=positions,
            threshold=threshold,
        ).items()
    }


def buffer(rows, vocab, device, extra=3):
    """A probs buffer with spare rows, and a shuffled row map (rows do not own row i)."""
    probs = torch.full((rows + extra, vocab), SENTINEL, device=device)
    probs_rows = torch.randperm(rows + extra, generator=torch.Generator().manual_seed(1))[:rows].to(device)
    return probs, probs_rows


def subset_of(vocab, size, device, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(vocab, generator=gen)[:size].sort().values.to(device)


def run_exit(backend, hidden, norm_weight, head, settings, vocab, vocab_ids=None):
    probs, probs_rows = buffer(hidden.shape[0], vocab, hidden.device)
    out = exit_sample(
        hidden, norm_weight, head, EPS, probs=probs, probs_rows=probs_rows, vocab_ids=vocab_ids,
        backend=backend, **settings,
    )  # fmt: skip
    return (*out, probs)


def assert_same(got, want, exact_tokens=True):
    tokens, confidence, fired, probs = got
    ref_tokens, ref_confidence, ref_fired, ref_probs = want
    assert tokens.dtype == torch.int64 and confidence.dtype == torch.float32 and fired.dtype == torch.bool
    torch.testing.assert_close(confidence, ref_confidence, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-4, atol=1e-6)
    if exact_tokens:
        assert torch.equal(fired, ref_fired)
        assert torch.equal(tokens, ref_tokens)
    else:
        # NOTE: bf16 / f16 logits tie up to summation order, and the exit decisions can flip where a
        # confidence sits on the threshold: most rows must still agree.
        assert (tokens == ref_tokens).float().mean() >= 0.75


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "dim", "vocab"), [(1, 64, 37), (8, 96, 1000), (13, 40, 3001)])
@pytest.mark.parametrize("subset", [False, True])
def test_exit_sample_matches_reference(device, backend, dtype, rows, dim, vocab, subset):
    hidden, norm_weight, lm_head = make_inputs(rows, dim, vocab, dtype, device)
    settings = row_settings(rows, device)
    vocab_ids = subset_of(vocab, max(1, vocab // 3), device) if subset else None
    head = lm_head[vocab_ids] if subset else lm_head
    got = run_exit(backend, hidden, norm_weight, head, settings, vocab, vocab_ids)
    want = run_exit("reference", hidden, norm_weight, head, settings, vocab, vocab_ids)
    assert_same(got, want, exact_tokens=dtype == torch.float32)
    tokens, _, fired, probs = got
    probs_rows = buffer(rows, vocab, device)[1]
    # Fired rows hold q (rows summing to 1 that contain the token); the rest of the buffer is untouched.
    owned = probs[probs_rows[fired]]
    torch.testing.assert_close(owned.sum(-1), torch.ones(int(fired.sum()), device=device))
    assert bool((owned.gather(1, tokens[fired][:, None]) > 0).all())
    untouched = torch.ones(probs.shape[0], dtype=torch.bool, device=device)
    untouched[probs_rows[fired]] = False
    assert bool((probs[untouched] == SENTINEL).all())
    if subset:
        outside = torch.ones(vocab, dtype=torch.bool, device=device)
        outside[vocab_ids] = False
        assert bool((owned[:, outside] == 0).all())
        assert bool(torch.isin(tokens, vocab_ids).all())


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 63, 64, 65, 4099])
def test_sample_logits_matches_reference(device, backend, dtype, vocab):
    rows = 8
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(device=device, dtype=dtype)
    settings = row_settings(rows, device, seed=vocab)
    results = []
    for chosen in (backend, "reference"):
        probs, probs_rows = buffer(rows, vocab, device)
        out = sample_logits(logits, probs=probs, probs_rows=probs_rows, backend=chosen, **settings)
        results.append((*out, probs))
    assert_same(*results)


def test_q_is_the_processed_distribution_and_confidence_its_max():
    """Independent of the reference's code path: q from processed_probs of exit_head_logits."""
    hidden, norm_weight, lm_head = make_inputs(8, 48, 503, torch.float32)
    settings = row_settings(8, "cpu")
    settings["threshold"] = torch.zeros(8)
    tokens, confidence, fired, probs = run_exit("cpu", hidden, norm_weight, lm_head, settings, 503)
    logits = exit_head_logits(hidden, norm_weight, lm_head, EPS)[:, None]
    t = settings["temperature"]
    min_logit = logit_threshold(logits, t, settings["top_k"], settings["top_p"])
    expected = processed_probs(logits, t, min_logit)[:, 0]
    greedy = t == 0
    expected[greedy] = torch.nn.functional.one_hot(logits[greedy, 0].argmax(-1), 503).float()
    probs_rows = buffer(8, 503, "cpu")[1]
    assert bool(fired.all())
    torch.testing.assert_close(probs[probs_rows], expected, rtol=1e-5, atol=1e-7)
    raw_top = torch.softmax(logits[:, 0], -1).amax(-1)
    torch.testing.assert_close(confidence, torch.where(greedy, raw_top, expected.amax(-1)))
    assert torch.equal(tokens[greedy], logits[greedy, 0].argmax(-1))


@pytest.mark.parametrize(("device", "backend"), [*CASES, ("cpu", "reference")])
@pytest.mark.parametrize("subset", [False, True])
def test_draws_follow_q(device, backend, subset):
    """Chi-square: one context drawn with many seeds follows q (with top-k and top-p, over a subset)."""
    interpreted = backend == "triton" and device == "cpu"
    if interpreted and not subset:
        pytest.skip("the interpreter runs a program per row: one Triton case (the subset) is enough")
    # NOTE: the interpreter takes ~60 ms per row; 200 draws still catch a wrong distribution.
    rows = 200 if interpreted else 4000
    vocab = 150
    hidden, norm_weight, lm_head = make_inputs(1, 16, vocab, torch.float32, device)
    hidden = hidden.expand(rows, -1).contiguous()
    vocab_ids = subset_of(vocab, 40, device) if subset else None
    head = lm_head[vocab_ids] if subset else lm_head
    settings = dict(
        temperature=1.5, top_k=25, top_p=0.95, seeds=torch.arange(rows, device=device) * 7919 + 3,
        offsets=11, positions=2, threshold=0.0,
    )  # fmt: skip
    probs = torch.zeros((rows, vocab), device=device)
    rows_map = torch.arange(rows, device=device)
    tokens, _, fired = exit_sample(
        hidden, norm_weight, head, EPS, probs=probs, probs_rows=rows_map, vocab_ids=vocab_ids,
        backend=backend, **settings,
    )  # fmt: skip
    assert bool(fired.all())
    q = probs[0].double().cpu()
    torch.testing.assert_close(probs, probs[:1].expand_as(probs))
    counts = torch.bincount(tokens.cpu(), minlength=vocab).double()
    support = q > 0
    assert counts[~support].sum() == 0
    expected = q[support] * rows
    big = expected >= 5  # NOTE: chi-square needs expected counts of 5 or more; lump the tail
    observed, expected = counts[support][big], expected[big]
    if not bool(big.all()):
        observed = torch.cat([observed, counts[support][~big].sum()[None]])
        expected = torch.cat([expected, (q[support] * rows)[~big].sum()[None]])
    _, p_value = chisquare(observed.numpy(), expected.numpy() * observed.sum().item() / expected.sum().item())
    assert p_value > 1e-3


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_rows_are_batch_invariant(device, backend):
    """A row's token, confidence and q do not depend on the other rows of the call."""
    rows, vocab = 8, 300
    hidden, norm_weight, lm_head = make_inputs(rows, 32, vocab, torch.float32, device)
    settings = row_settings(rows, device)
    settings["threshold"] = torch.zeros(rows, device=device)
    full = run_exit(backend, hidden, norm_weight, lm_head, settings, vocab)
    probs_rows = buffer(rows, vocab, device)[1]
    for i in (0, 3, 5):
        one = {k: v[i : i + 1] for k, v in settings.items()}
        tokens, confidence, _, probs = run_exit(backend, hidden[i : i + 1], norm_weight, lm_head, one, vocab)
        assert tokens.item() == full[0][i].item()
        torch.testing.assert_close(confidence[0], full[1][i])
        mine = buffer(1, vocab, device)[1]
        torch.testing.assert_close(probs[mine[0]], full[3][probs_rows[i]])


@pytest.mark.parametrize(("device", "backend"), [*CASES, ("cpu", "reference")])
def test_seeds_offsets_and_positions_change_the_draw(device, backend):
    rows, vocab = (16 if backend == "triton" and device == "cpu" else 64), 200
    logits = torch.zeros((rows, vocab), device=device)  # uniform q: every draw is equally likely
    base = dict(temperature=1.0, top_k=0, top_p=1.0, threshold=0.0)
    draws = {}
    for name, change in {
        "base": {},
        "seed": {"seeds": torch.arange(rows, device=device) + 1},
        "offset": {"offsets": 6},
        "position": {"positions": 1},
    }.items():
        args = {"seeds": torch.arange(rows, device=device), "offsets": 5, "positions": 0, **base, **change}
        probs = torch.zeros((rows, vocab), device=device)
        draws[name] = sample_logits(
            logits, probs=probs, probs_rows=torch.arange(rows, device=device), backend=backend, **args
        )[0]
    again = sample_logits(
        logits, probs=torch.zeros((rows, vocab), device=device), probs_rows=torch.arange(rows, device=device),
        seeds=torch.arange(rows, device=device), offsets=5, positions=0, backend=backend, **base,
    )[0]  # fmt: skip
    assert torch.equal(again, draws["base"])
    for name in ("seed", "offset", "position"):
        assert (draws[name] != draws["base"]).float().mean() > 0.8, name


@pytest.mark.parametrize(("device", "backend"), [*CASES, ("cpu", "reference")])
def test_non_finite_row_is_uniform_over_the_head_vocabulary(device, backend):
    rows, vocab = 3, 90
    vocab_ids = subset_of(vocab, 30, device)
    logits = torch.randn(rows, 30, device=device)
    logits[1] = float("nan")
    logits[2] = float("-inf")
    logits[2, 4] = float("inf")  # counts as the largest float: a sure winner
    probs = torch.zeros((rows, vocab), device=device)
    tokens, confidence, fired = sample_logits(
        logits, temperature=torch.tensor([1.0, 1.0, 0.7], device=device), top_k=0, top_p=1.0, seeds=1,
        offsets=0, positions=0, threshold=0.0, probs=probs, probs_rows=torch.arange(rows, device=device),
        vocab_ids=vocab_ids, backend=backend,
    )  # fmt: skip
    assert confidence[1].item() == pytest.approx(1 / 30)
    expected = torch.zeros(vocab, device=device)
    expected[vocab_ids] = 1 / 30
    torch.testing.assert_close(probs[1], expected)
    assert tokens[2].item() == vocab_ids[4].item() and confidence[2].item() == 1.0
    assert bool(torch.isfinite(probs).all())


@pytest.mark.parametrize(("device", "backend"), CASES)
def test_greedy_ties_take_the_smallest_id(device, backend):
    logits = torch.zeros((2, 300), device=device)
    logits[:, [70, 7, 250]] = 5.0
    probs = torch.zeros((2, 300), device=device)
    tokens, _, _ = sample_logits(
        logits, temperature=0.0, top_k=0, top_p=1.0, seeds=0, offsets=0, positions=0, threshold=0.0,
        probs=probs, probs_rows=torch.arange(2, device=device), backend=backend,
    )  # fmt: skip
    assert tokens.tolist() == [7, 7]
    assert probs[:, 7].tolist() == [1.0, 1.0] and probs.sum().item() == 2.0


def _opcheck_args(device, with_ids):
    hidden, norm_weight, lm_head = make_inputs(4, 16, 45, torch.float32, device)
    settings = row_settings(4, device)
    ids = subset_of(45, 20, device) if with_ids else None
    head = lm_head[ids] if with_ids else lm_head
    probs = torch.zeros((5, 45), device=device)
    rows = torch.tensor([4, 0, 2, 1], device=device)
    tail = (settings["threshold"], ids, probs, rows, True)
    per_row = tuple(settings[k] for k in ("temperature", "top_k", "top_p", "seeds", "offsets", "positions"))
    return (hidden, norm_weight, head, EPS, *per_row, *tail)


@pytest.mark.parametrize(("device", "backend"), CASES)
@pytest.mark.parametrize("with_ids", [False, True])
def test_opcheck(device, backend, with_ids):
    if backend == "triton":
        from s2d_ext.triton.exit_sample import exit_sample_triton  # noqa: F401  (registers the ops)
    exit_op = torch.ops.s2d.exit_sample_triton if backend == "triton" else torch.ops.s2d.exit_sample
    logits_op = torch.ops.s2d.sample_logits_triton if backend == "triton" else torch.ops.s2d.sample_logits
    args = _opcheck_args(device, with_ids)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(exit_op, args, test_utils=utils)
    logits = exit_head_logits(args[0], args[1], args[2], EPS)
    torch.library.opcheck(logits_op, (logits, *args[4:]), test_utils=utils)


def test_filters_false_skips_top_k_and_top_p():
    logits = torch.randn(2, 50)
    results = []
    for filters in (False, None):
        probs = torch.zeros((2, 50))
        sample_logits(
            logits, temperature=1.0, top_k=torch.tensor([3, 3]), top_p=1.0, seeds=0, offsets=0, positions=0,
            threshold=0.0, probs=probs, probs_rows=torch.arange(2), filters=filters,
        )  # fmt: skip
        results.append(probs)
    assert bool((results[0] > 0).all())
    assert (results[1] > 0).sum(-1).tolist() == [3, 3]


def _good_args():
    hidden, norm_weight, lm_head = make_inputs(2, 8, 13, torch.float32)
    return dict(
        hidden=hidden, norm_weight=norm_weight, lm_head_weight=lm_head, eps=EPS, temperature=1.0, top_k=0,
        top_p=1.0, seeds=1, offsets=0, positions=0, threshold=0.0, probs=torch.zeros(4, 13),
        probs_rows=torch.tensor([0, 3]),
    )  # fmt: skip


BAD_INPUTS = [
    ({"hidden": torch.zeros(2, 8, dtype=torch.int32)}, TypeError, "hidden"),
    ({"lm_head_weight": torch.ones(13, 9)}, ValueError, "lm_head_weight"),
    ({"temperature": -0.5}, ValueError, "temperature"),
    ({"top_k": -1}, ValueError, "top_k"),
    ({"top_k": 1.5}, TypeError, "top_k"),
    ({"top_p": 0.0}, ValueError, "top_p"),
    ({"top_p": torch.tensor([0.5, float("nan")])}, ValueError, "top_p"),
    ({"positions": 2**16}, ValueError, "positions"),
    ({"positions": torch.tensor([0, -1])}, ValueError, "positions"),
    ({"threshold": float("nan")}, ValueError, "threshold"),
    ({"seeds": 1.5}, TypeError, "seeds"),
    ({"offsets": torch.zeros(3, dtype=torch.int64)}, ValueError, "offsets"),
    ({"probs": torch.zeros(4, 13, dtype=torch.float64)}, TypeError, "probs"),
    ({"probs": torch.zeros(13, 4).t()}, ValueError, "probs"),
    ({"probs": torch.zeros(4, 12)}, ValueError, "probs"),
    ({"probs_rows": torch.tensor([0, 4])}, ValueError, "probs_rows"),
    ({"probs_rows": torch.tensor([1, 1])}, ValueError, "probs_rows"),
    ({"probs_rows": torch.tensor([0])}, ValueError, "probs_rows"),
    ({"probs_rows": torch.tensor([0.0, 1.0])}, TypeError, "probs_rows"),
    ({"vocab_ids": torch.arange(12)}, ValueError, "vocab_ids"),
    ({"backend": "tpu"}, ValueError, "backend"),
]


@pytest.mark.parametrize(("change", "error", "name"), BAD_INPUTS)
def test_bad_inputs(change, error, name):
    with pytest.raises(error, match=name):
        exit_sample(**{**_good_args(), **change})


@pytest.mark.parametrize(
    ("vocab_ids", "message"),
    [
        (torch.tensor([0, 5, 5, 9]), "sorted"),
        (torch.tensor([0, 5, 4, 9]), "sorted"),
        (torch.tensor([0, 5, 9, 13]), r"\[0, V=13\)"),
        (torch.tensor([-1, 5, 9, 12]), r"\[0, V=13\)"),
    ],
)
def test_bad_vocab_ids(vocab_ids, message):
    args = _good_args()
    args["lm_head_weight"] = args["lm_head_weight"][:4]
    with pytest.raises(ValueError, match=message):
        exit_sample(**args, vocab_ids=vocab_ids)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
def test_empty_batch(device, backend):
    if backend != "reference" and backend not in backends_for("exit_head", device):
        pytest.skip(f"{backend} not available on {device}")
    hidden, norm_weight, lm_head = make_inputs(0, 8, 11, torch.float32, device)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    tokens, confidence, fired = exit_sample(
        hidden, norm_weight, lm_head, EPS, 1.0, 0, 1.0, empty, empty, empty, 0.0,
        torch.zeros(2, 11, device=device), empty, backend=backend,
    )  # fmt: skip
    assert tokens.shape == confidence.shape == fired.shape == (0,)


@pytest.mark.parametrize(("device", "backend"), [c for c in CASES if c[1] != "reference"])
def test_out_of_contract_rows_and_ids_stay_inside_probs_without_value_checks(device, backend):
    # Regression: with validate=False (or a direct torch.ops call) a probs row outside [0, M) or a head id
    # outside [0, V) was written anyway: outside probs, and a segfault on the CPU for an id of 2**36.
    # Such input now writes nothing there (its outputs are unspecified, memory is not touched).
    rows, vocab = 3, 8
    logits = torch.randn(rows, 4, generator=torch.Generator().manual_seed(3)).to(device) * 3
    base = torch.full((6, vocab), SENTINEL, device=device)
    probs = base[1:4]  # M = 3: rows 0, 4 and 5 of base are outside it
    for temperature in (0.0, 1.0):
        sample_logits(
            logits, temperature, 0, 1.0, torch.tensor([1, 2, 3], device=device), 0, 0, 0.0,
            probs, torch.tensor([-1, 1, 3], device=device),  # rows 0 and 2 point outside probs
            vocab_ids=torch.tensor([0, 3, 10, 2**36], device=device),  # the last two are no ids of V=8
            backend=backend, validate=False,
        )  # fmt: skip
        outside = torch.cat([base[:1], base[4:], probs[0:1], probs[2:3]])
        assert bool((outside == SENTINEL).all())
        written = probs[1].cpu()
        assert bool((written[[1, 2, 4, 5, 6, 7]] == 0).all()) and float(written.sum()) <= 1 + 1e-6
