"""SoFT: the loss is the mean of per-exit CE (by hand), training lowers every exit's loss, checkpoints
round-trip and resume exactly, bad input is refused."""

import json

import pytest
import torch
import torch.nn.functional as F

from python_tests.train.conftest import TEXT, tiny_llama
from s2d_ext.train import soft


def _hand_exit_logits(model, input_ids, attention_mask, exits):
    """Per-exit logits from forward hooks on the decoder layers (not output_hidden_states)."""
    captured = {}
    hooks = [
        layer.register_forward_hook(
            lambda mod, inp, out, i=i: captured.__setitem__(i + 1, out[0] if isinstance(out, tuple) else out)
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [model.lm_head(model.model.norm(captured[e])) for e in exits]


def _hand_ce(logits, input_ids, attention_mask):
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")  # [B, L-1]
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).float()
    return (ce * valid).sum() / valid.sum()


def test_soft_loss_is_mean_of_per_exit_ce():
    model = tiny_llama(num_layers=3)
    input_ids = torch.randint(2, 64, (3, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding
    attention_mask[2, :1] = 0
    exits = (1, 2, 3)
    with torch.no_grad():
        out = soft.soft_loss(model, input_ids, attention_mask, exits)
        hand = [
            _hand_ce(lg, input_ids, attention_mask)
            for lg in _hand_exit_logits(model, input_ids, attention_mask, exits)
        ]
    torch.testing.assert_close(out.ce_per_exit, torch.stack(hand), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, torch.stack(hand).mean(), rtol=1e-5, atol=1e-5)
    # the last exit is the model's own LM loss
    hf_loss = model(input_ids=input_ids, labels=input_ids).loss
    plain = soft.soft_loss(model, input_ids, None, (3,)).loss
    torch.testing.assert_close(plain, hf_loss, rtol=1e-5, atol=1e-5)


def test_soft_loss_distillation_term_by_hand():
    model = tiny_llama(num_layers=2)
    teachers = [torch.randn(2, 9, 64), torch.randn(2, 9, 64)]
    input_ids = torch.randint(0, 64, (2, 9))
    weights, temperature = (0.3, 0.7), 2.0
    with torch.no_grad():
        out = soft.soft_loss(
            model,
            input_ids,
            None,
            (1, 2),
            target_logits=teachers,
            distill_weights=weights,
            distill_temperature=temperature,
            ce_weight=0.5,
        )
        expected = []
        for lg in _hand_exit_logits(model, input_ids, torch.ones_like(input_ids), (1, 2)):
            ce = F.cross_entropy(lg[:, :-1].reshape(-1, 64), input_ids[:, 1:].reshape(-1))
            kl = 0.0
            for w, t in zip(weights, teachers):
                log_q = F.log_softmax(lg[:, :-1] / temperature, -1).reshape(-1, 64)
                log_p = F.log_softmax(t[:, :-1] / temperature, -1).reshape(-1, 64)
                kl = kl + w * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2
            expected.append(0.5 * ce + kl)
    torch.testing.assert_close(out.loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-5)


def _pattern_blocks(n=24, length=24, vocab=64):
    g = torch.Generator().manual_seed(0)
    base = torch.randint(2, vocab, (8,), generator=g)
    stream = base.repeat(n * length // 8 + 1)[: n * length]
    return stream.view(n, length)


def test_a_few_steps_lower_every_exit_loss(tiny_tokenizer):
    blocks = soft.tokenize_blocks([TEXT], tiny_tokenizer, seq_len=32)
    model = tiny_llama(num_layers=3, vocab_size=len(tiny_tokenizer))
    draft = soft.truncate_model(model, 3, (1, 2, 3))
    before = soft.heldout_loss(draft, blocks)
    soft.train_soft(
        draft, blocks, soft.SoftConfig(max_steps=12, batch_size=4, lr=3e-3, warmup_steps=2), progress=False
    )
    after = soft.heldout_loss(draft, blocks)
    assert all(a < b - 0.5 for a, b in zip(after, before)), (before, after)


def test_gradient_accumulation_matches_big_batch():
    blocks = _pattern_blocks()
    a = tiny_llama(num_layers=2)
    b = tiny_llama(num_layers=2)
    soft.train_soft(
        a, blocks, soft.SoftConfig(max_steps=2, batch_size=8, grad_accum=1, warmup_steps=0), progress=False
    )
    soft.train_soft(
        b, blocks, soft.SoftConfig(max_steps=2, batch_size=4, grad_accum=2, warmup_steps=0), progress=False
    )
    # NOTE: same blocks per step (the index stream is shared), the mean of two half-batch means == full mean.
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_checkpoint_round_trip_and_sorted_draft_format(tmp_path):
    from transformers import AutoModelForCausalLM

    from s2d_ext import SortedDraft

    base = tiny_llama(num_layers=4)
    draft = soft.truncate_model(base, 3, (1, 2, 3), thresholds=(0.7, 0.4, 0.0))
    cfg = soft.SoftConfig(max_steps=3, batch_size=4, warmup_steps=1)
    soft.train_soft(draft, _pattern_blocks(), cfg, out_dir=tmp_path / "out", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.s2d_exits == [1, 2, 3] and loaded.config.s2d_thresholds == [0.7, 0.4, 0.0]
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        for lg_a, lg_b in zip(soft.exit_logits(draft, x), soft.exit_logits(loaded, x)):
            torch.testing.assert_close(lg_a, lg_b, rtol=0, atol=0)
    sd = SortedDraft.from_pretrained(tmp_path / "out")
    assert sd.exits == (1, 2, 3) and tuple(sd.thresholds) == pytest.approx((0.7, 0.4, 0.0))
    record = json.loads((tmp_path / "out" / soft.CONFIG_FILE).read_text())
    assert record["step"] == 3 and record["exits"] == [1, 2, 3]


def test_draft_vocab_is_counted_on_the_data_and_saved_with_every_checkpoint(tmp_path):
    from s2d_ext import SortedDraft
    from s2d_ext.draft.draft_vocab import load_draft_vocab, most_frequent_tokens

    blocks = _pattern_blocks()
    draft = soft.truncate_model(tiny_llama(num_layers=3), 2, (1, 2))
    cfg = soft.SoftConfig(max_steps=2, batch_size=4, warmup_steps=1, draft_vocab=12)
    soft.train_soft(draft, blocks, cfg, out_dir=tmp_path / "out", progress=False)
    saved = load_draft_vocab(tmp_path / "out")
    assert saved.tolist() == most_frequent_tokens(blocks, 64, 12).tolist()
    assert SortedDraft.from_pretrained(tmp_path / "out").draft_vocab.tolist() == saved.tolist()
    with pytest.raises(ValueError, match="draft_vocab"):
        soft.train_soft(draft, blocks, soft.SoftConfig(max_steps=1, draft_vocab=65), progress=False)
    with pytest.raises(ValueError, match="draft_vocab"):
        soft.train_soft(draft, blocks, soft.SoftConfig(max_steps=1, draft_vocab=-1), progress=False)


def test_resume_is_exact_and_deterministic(tmp_path):
    blocks = _pattern_blocks()
    cfg = soft.SoftConfig(exits=(1, 2), max_steps=4, batch_size=4, warmup_steps=1, save_every=2)
    straight = tiny_llama(num_layers=2)
    soft.train_soft(straight, blocks, cfg, progress=False)
    again = tiny_llama(num_layers=2)
    soft.train_soft(again, blocks, cfg, progress=False)
    for pa, pb in zip(straight.parameters(), again.parameters()):
        assert torch.equal(pa, pb)  # deterministic given the seed
    # 2 steps, "crash", then resume to 4
    first = tiny_llama(num_layers=2)
    soft.train_soft(
        first,
        blocks,
        soft.SoftConfig(**{**cfg.__dict__, "max_steps": 2}),
        out_dir=tmp_path / "o",
        progress=False,
    )
    resumed = tiny_llama(num_layers=2, seed=123)  # weights come from the checkpoint
    result = soft.train_soft(resumed, blocks, cfg, out_dir=tmp_path / "o", resume=True, progress=False)
    assert result.step == 4 and len(result.history) == 4
    for pa, pb in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_truncate_keeps_the_prefix():
    base = tiny_llama(num_layers=4, tie=True)
    draft = soft.truncate_model(base, 2, (1, 2))
    x = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        expected = soft.exit_logits(base, x, exits=(2, 4))[0]
        torch.testing.assert_close(draft(x).logits, expected, rtol=1e-5, atol=1e-5)
    assert base.config.num_hidden_layers == 4 and len(base.model.layers) == 4
    assert draft.config.s2d_exits == [1, 2]


@pytest.mark.parametrize(
    ("exits", "layers", "match"),
    [
        ((1, 2), 3, "last exit"),
        ((2, 1, 3), 3, "increasing"),
        ((0, 3), 3, ">= 1"),
        ((), 3, "empty"),
        ((2, 2, 3), 3, "increasing"),
    ],
)
def test_exits_that_do_not_fit_are_refused(exits, layers, match):
    with pytest.raises(ValueError, match=match):
        soft.validate_exits(exits, layers)


def test_truncate_refuses_bad_layers():
    base = tiny_llama(num_layers=3)
    with pytest.raises(ValueError, match="num_layers"):
        soft.truncate_model(base, 4)
    with pytest.raises(ValueError, match="last exit"):
        soft.truncate_model(base, 2, (1, 3))


def test_data_files(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        soft.load_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        soft.load_texts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"other": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        soft.load_texts(tmp_path / "bad.jsonl")
    (tmp_path / "ok.jsonl").write_text('{"text": "def f(): pass"}\n\n{"text": "x = 1"}\n')
    assert soft.load_texts(tmp_path / "ok.jsonl") == ["def f(): pass", "x = 1"]
    (tmp_path / "plain.txt").write_text(TEXT)
    assert soft.load_texts(tmp_path / "plain.txt") == [TEXT]
    blocks = soft.tokenize_blocks([TEXT, TEXT], tiny_tokenizer, seq_len=16)
    assert blocks.dim() == 2 and blocks.shape[1] == 16 and blocks.dtype == torch.long


def test_output_folder_holding_something_else_is_refused(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        soft.prepare_output_dir(tmp_path / "other", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        soft.prepare_output_dir(tmp_path / "file")
    model = tiny_llama(num_layers=1)
    soft.train_soft(
        model,
        _pattern_blocks(4),
        soft.SoftConfig(max_steps=1, batch_size=2),
        out_dir=tmp_path / "ckpt",
        progress=False,
    )
    with pytest.raises(ValueError, match="--resume"):
        soft.prepare_output_dir(tmp_path / "ckpt")
    assert soft.prepare_output_dir(tmp_path / "ckpt", resume=True) is True
    assert soft.prepare_output_dir(tmp_path / "ckpt", overwrite=True) is False
    with pytest.raises(ValueError, match="no SoFT checkpoint"):
        soft.prepare_output_dir(tmp_path / "fresh", resume=True)
