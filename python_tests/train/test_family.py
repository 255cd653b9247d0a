"""Family builder on a test-sized spec (seconds): deterministic, cached, corruption detected and rebuilt."""

import json

import pytest
import torch
from safetensors.torch import load_file

from s2d_ext.train import family
from s2d_ext.train.family.build import grow_target

SPEC = family.FamilySpec(
    size="test",
    vocab_size=300,
    seq_len=32,
    batch_size=4,
    targets=(
        family.TargetSpec("target-small", 32, 2, 64, 2, 2, steps=3, lr=3e-3),
        family.TargetSpec("target-large", 32, 3, 64, 2, 2, steps=2, lr=3e-3, grow_from="target-small"),
        family.TargetSpec("target-wide", 48, 2, 96, 2, 2, steps=2, lr=3e-3),
    ),
    draft=family.DraftSpec(
        source="target-small",
        num_layers=1,
        exits=(1,),
        thresholds=(0.0,),
        steps=2,
        lr=1e-3,
        distill=(("target-small", 0.5), ("target-wide", 0.5)),
    ),
    corpus_chars=40_000,
    tokenizer_chars=20_000,
    heldout_tokens=256,
    warmup_steps=1,
)
NAMES = ["target-small", "target-large", "target-wide", "draft"]


def _weights(root):
    # NOTE: clone: safetensors may memory-map the file, which a test below corrupts in place.
    return {
        name: {k: v.clone() for k, v in load_file(root / name / "model.safetensors").items()}
        for name in NAMES
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("family")
    root = family.build_family(SPEC, cache, progress=False, log=lambda msg: None)
    return cache, root


def test_build_is_deterministic(built, tmp_path):
    _, root = built
    other = family.build_family(SPEC, tmp_path, progress=False, log=lambda msg: None)
    a, b = _weights(root), _weights(other)
    for name in NAMES:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    assert (root / "tokenizer" / "tokenizer.json").read_text() == (
        other / "tokenizer" / "tokenizer.json"
    ).read_text()


def test_manifest_and_load(built):
    cache, root = built
    assert family.check_family(SPEC, cache) is None
    manifest = json.loads((root / family.MANIFEST).read_text())
    assert manifest["complete"] and set(manifest["models"]) == set(NAMES)
    for info in manifest["models"].values():
        assert info["params"] > 0 and info["train_tokens"] > 0
    assert manifest["models"]["target-small"]["train_tokens"] == 3 * 4 * 32
    assert set(manifest["models"]["draft"]["heldout_loss"]) == {"1"}
    tokenizer, targets, draft = family.load_family(SPEC, cache, build=False)
    assert list(targets) == ["target-small", "target-large", "target-wide"]
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert draft.exits == (1,)
    # the draft is the first layer of the smallest target, fine-tuned (so no longer equal to it)
    assert draft.hf_model.config.hidden_size == targets["target-small"].config.hidden_size


def test_complete_cache_is_not_rebuilt(built):
    cache, root = built
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    family.build_family(SPEC, cache, progress=False, log=lambda msg: None)
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert before == after


def test_corrupt_or_incomplete_cache_is_detected_and_rebuilt(tmp_path):
    root = family.build_family(SPEC, tmp_path, progress=False, log=lambda msg: None)
    reference = _weights(root)
    # a flipped byte in a weight file
    weights = root / "target-large" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "checksum" in family.check_family(SPEC, tmp_path)
    with pytest.raises(FileNotFoundError, match="family build"):
        family.load_family(SPEC, tmp_path, build=False)
    family.build_family(SPEC, tmp_path, progress=False, log=lambda msg: None)
    assert family.check_family(SPEC, tmp_path) is None
    rebuilt = _weights(root)
    assert all(
        torch.equal(reference["target-large"][k], rebuilt["target-large"][k]) for k in rebuilt["target-large"]
    )
    # an interrupted build: no manifest, a half-written temporary folder
    (root / family.MANIFEST).unlink()
    (root / ".draft.tmp-1").mkdir()
    assert family.check_family(SPEC, tmp_path) is not None
    tokenizer, targets, draft = family.load_family(SPEC, tmp_path)  # builds what is missing, then loads
    assert family.check_family(SPEC, tmp_path) is None and len(targets) == 3


def test_spec_change_invalidates_the_cache(built):
    cache, _ = built
    import dataclasses

    other = dataclasses.replace(SPEC, seed=1)
    assert "another spec" in family.check_family(other, cache)


def test_family_dir_and_bad_size(tmp_path, monkeypatch):
    monkeypatch.setenv("S2D_FAMILY_DIR", str(tmp_path))
    assert family.family_dir("tiny") == tmp_path / "tiny"
    assert family.family_dir("bench", tmp_path / "x") == tmp_path / "x" / "bench"
    with pytest.raises(ValueError, match="size"):
        family.get_spec("huge")


def test_named_sizes_are_consistent():
    for spec in family.FAMILY_SIZES.values():
        names = [t.name for t in spec.targets]
        assert spec.draft.source == names[0]  # cut from the smallest target, as the paper does
        assert spec.draft.exits[-1] == spec.draft.num_layers
        assert all(name in names for name, _ in spec.draft.distill)
        sizes = [t.hidden_size * t.hidden_size * t.num_layers for t in spec.targets]
        assert all(t.grow_from in names[:i] for i, t in enumerate(spec.targets) if t.grow_from)
        assert sizes == sorted(sizes)
    big = family.FAMILY_SIZES["bench"].targets[-1]
    v = family.FAMILY_SIZES["bench"].vocab_size
    layer = 4 * big.hidden_size**2 + 3 * big.hidden_size * big.intermediate_size + 2 * big.hidden_size
    params = big.num_layers * layer + v * big.hidden_size * (1 if big.tie_embeddings else 2) + big.hidden_size
    assert params >= 40_000_000


def test_grown_target_starts_as_its_source():
    from python_tests.train.conftest import tiny_llama

    source = tiny_llama(num_layers=2, hidden_size=32)
    grown = tiny_llama(num_layers=4, hidden_size=32, seed=1)
    grow_target(grown, source)
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(grown(x).logits, source(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="hidden_size"):
        grow_target(tiny_llama(num_layers=4, hidden_size=48), source)


def test_draft_vocab_is_added_to_a_complete_cache(built):
    from s2d_ext.draft.draft_vocab import load_draft_vocab

    cache, root = built
    before = _weights(root)
    family.build_family(SPEC, cache, progress=False, log=lambda msg: None, draft_vocab=50)
    vocab = load_draft_vocab(root / "draft")
    assert vocab.numel() == 50 and vocab.tolist() == family.family_draft_vocab(SPEC, 50, cache).tolist()
    manifest = json.loads((root / family.MANIFEST).read_text())
    record = manifest["draft_vocab"]
    assert record["size"] == 50 and 0.5 < record["train_token_coverage"] <= 1
    assert family.check_family(SPEC, cache) is None  # the models are untouched
    after = _weights(root)
    assert all(torch.equal(before[n][k], after[n][k]) for n in NAMES for k in before[n])
    _, _, draft = family.load_family(SPEC, cache, build=False)
    assert draft.draft_vocab.tolist() == vocab.tolist()
