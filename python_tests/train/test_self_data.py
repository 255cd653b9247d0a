"""Self-written training data (s2d_ext.train.self_data) on a tiny random chat model: prompts, decoding, cache
(deterministic, resumable, checksummed) and that no training prompt is an evaluation prompt."""

from __future__ import annotations

import json

import pytest
import torch

from python_tests.train.conftest import tiny_llama
from s2d_ext.train import self_data
from s2d_ext.train.self_data.build import _select_prompts
from s2d_ext.train.self_data.cache import sha256_file

CHAT_TEMPLATE = (
    "{% for m in messages %}SYSTEM: be brief\n{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tiny_tokenizer.chat_template = CHAT_TEMPLATE
    yield tiny_tokenizer
    tiny_tokenizer.chat_template = None


@pytest.fixture
def chat_model(chat_tokenizer):
    model = tiny_llama(num_layers=2, vocab_size=len(chat_tokenizer), hidden_size=32)
    model.generation_config.eos_token_id = chat_tokenizer.eos_token_id
    # NOTE: a random model rarely samples EOS; a larger EOS row makes some Magpie turns end, as real ones do.
    with torch.no_grad():
        model.lm_head.weight[chat_tokenizer.eos_token_id] *= 12.0
    return model


def small_spec(**kw):
    base = dict(
        name="tiny",
        magpie_prompts=12,
        docstring_prompts=6,
        max_new_tokens=6,
        max_user_tokens=40,
        top_k=4,
        shard_size=4,
        batch_size=3,
        dtype="float32",
    )
    base.update(kw)
    return self_data.SelfDataSpec(**base)


def test_docstring_prompts_are_deterministic_and_from_the_stdlib():
    a = self_data.docstring_prompts(25, seed=0)
    assert a == self_data.docstring_prompts(25, seed=0)
    assert a != self_data.docstring_prompts(25, seed=1)
    assert len(a) == 25 and len(set(a)) == 25
    modules = {module for module, _, _ in self_data.docstring_entries()}
    assert {"json", "os", "collections"} <= modules
    assert all("`" in p or "documentation" in p for p in a)


def test_user_header_is_the_template_up_to_the_user_text(chat_tokenizer, tiny_tokenizer):
    header = self_data.user_header(chat_tokenizer)
    assert chat_tokenizer.decode(header) == "SYSTEM: be brief\nuser: "
    chat_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        self_data.user_header(tiny_tokenizer)


def test_decode_batch_greedy_rows_match_generate(chat_model, chat_tokenizer):
    prompts = [self_data.chat_prompt_ids(chat_tokenizer, t) for t in ("def add", "class Point: x")]
    out = self_data.decode_batch(
        chat_model,
        prompts,
        max_new_tokens=7,
        temperatures=[0.0, 0.0],
        stop_ids=[chat_tokenizer.eos_token_id],
        pad_id=chat_tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(0),
        top_k_record=5,
    )
    for ids, row in zip(prompts, out):
        ref = chat_model.generate(
            torch.tensor([ids]),
            max_new_tokens=7,
            do_sample=False,
            eos_token_id=chat_tokenizer.eos_token_id,
            pad_token_id=chat_tokenizer.pad_token_id,
        )[0, len(ids) :].tolist()
        assert row.tokens == ref
        # the recorded top-1 is the greedy token, and the top-k are log-probabilities in decreasing order
        assert row.topk_ids[:, 0].tolist() == row.tokens
        assert bool((row.topk_logprobs.diff(dim=-1) <= 0).all())
        assert bool((row.topk_logprobs.exp().sum(-1) <= 1 + 1e-5).all())


def _digests(root):
    """SHA-256 of every data file (the manifest also records the build's duration, so it is left out)."""
    return {
        p.name: sha256_file(p) for p in sorted(root.iterdir()) if p.is_file() and p.name != self_data.MANIFEST
    }


def test_build_is_deterministic_resumable_and_checked(tmp_path, chat_model, chat_tokenizer):
    spec = small_spec()
    a = self_data.build_self_data(chat_model, chat_tokenizer, spec, "fp", tmp_path / "a", progress=False)
    assert self_data.check_self_data("tiny", tmp_path / "a") is None
    data = self_data.load_self_data(a)
    assert data.num_sequences == len(data.prompts) > spec.docstring_prompts
    assert {p["source"] for p in data.prompts} == {"magpie", "docstring"}
    assert data.topk_ids.shape == (data.num_answer_tokens, spec.top_k)
    # every sequence is its prompt through the chat template, then the answer whose top-1s were recorded
    for i in range(data.num_sequences):
        seq = data.sequence(i).tolist()
        start = int(data.answer_start[i])
        assert seq[:start] == self_data.chat_prompt_ids(chat_tokenizer, data.prompts[i]["text"])
        rows = data.topk_ids[data.answer_offsets[i] : data.answer_offsets[i + 1]]
        assert len(rows) == len(seq) - start
        if data.temperature[i] == 0:
            assert rows[:, 0].tolist() == seq[start:]

    # interrupted after its first answer shard, then resumed: the same files, byte for byte
    class Stop(Exception):
        pass

    def stop_at_answers(name):
        if name.startswith("answers_"):
            raise Stop

    with pytest.raises(Stop):
        self_data.build_self_data(
            chat_model, chat_tokenizer, spec, "fp", tmp_path / "b", progress=False, on_file=stop_at_answers
        )
    assert self_data.check_self_data("tiny", tmp_path / "b") is not None
    written = []
    self_data.build_self_data(
        chat_model, chat_tokenizer, spec, "fp", tmp_path / "b", progress=False, on_file=written.append
    )
    assert not any(name.startswith("magpie_") for name in written)  # finished shards were kept
    assert _digests(a) == _digests(tmp_path / "b" / "tiny")

    # a damaged shard is found and only that shard is rebuilt
    shard = a / "answers_00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert "checksum mismatch" in self_data.check_self_data("tiny", tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="damaged"):
        self_data.load_self_data(a)
    written.clear()
    self_data.build_self_data(
        chat_model, chat_tokenizer, spec, "fp", tmp_path / "a", progress=False, on_file=written.append
    )
    assert written == ["answers_00001.safetensors"]
    assert _digests(a) == _digests(tmp_path / "b" / "tiny")

    # another target (fingerprint) or spec is another data set: the cache is not reused
    assert spec.fingerprint("fp") != spec.fingerprint("other")
    assert spec.fingerprint("fp") != small_spec(seed=1).fingerprint("fp")


def test_no_training_prompt_equals_an_evaluation_prompt(chat_tokenizer):
    evaluation = self_data.evaluation_prompts()
    assert len(evaluation) > 480  # every turn of the 480 Spec-Bench questions
    question = json.loads(self_data_default_data().read_text().splitlines()[3])["turns"][0]
    turns = [
        {"text": question, "finished": True},  # a Magpie turn equal to a Spec-Bench question ...
        {"text": "  " + question.upper() + " ", "finished": True},  # ... up to case and spaces
        {"text": "Tell me a fact about owls.", "finished": True},
        {"text": "Tell me a fact about owls.", "finished": True},  # repeats are dropped too
        {"text": "An unfinished turn that ran out of", "finished": False},
    ]
    spec = small_spec(docstring_prompts=768)
    chosen = _select_prompts(spec, chat_tokenizer, turns)
    texts = [c["text"] for c in chosen]
    assert texts.count("Tell me a fact about owls.") == 1
    assert not any("ran out of" in t for t in texts)
    assert not {self_data.normalize_prompt(t) for t in texts} & evaluation
    assert sum(c["source"] == "docstring" for c in chosen) >= 700
    # temperatures cycle: half greedy, the rest sampled at 0.7 and 1
    temps = [c["temperature"] for c in chosen]
    assert temps[:4] == [0.0, 0.0, 0.7, 1.0]


def self_data_default_data():
    from s2d_ext.bench.arguments import DEFAULT_DATA

    return DEFAULT_DATA


def test_writing_in_bfloat16_leaves_the_float32_target_as_it_was(tmp_path, chat_model, chat_tokenizer):
    # Regression: the build cast the target to bfloat16 and back, rounding its weights for good, so the
    # draft cut from it afterwards (and the embedding digests it references) changed.
    before = {k: v.clone() for k, v in chat_model.state_dict().items()}
    spec = small_spec(magpie_prompts=3, docstring_prompts=2, dtype="bfloat16")
    self_data.build_self_data(chat_model, chat_tokenizer, spec, "fp", tmp_path, progress=False)
    after = chat_model.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items())
