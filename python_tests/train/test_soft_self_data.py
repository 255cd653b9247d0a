"""SoFT on self-written data: topk_kl, self_data_batch, self_data_loss and train_soft_self_data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from python_tests.train.conftest import tiny_llama
from s2d_ext.train import soft
from s2d_ext.train.self_data import SelfData


def coarse_kl_reference(p_full, q_full, ids, vocab=None):
    """KL between p and q coarsened to the outcomes ids[0..K-1] and 'everything else' (dense, explicit).
    With a draft vocabulary q lives on it; recorded ids the draft lacks fall into 'everything else'."""
    out = []
    for row in range(p_full.shape[0]):
        keep = [int(i) for i in ids[row] if vocab is None or int(i) in vocab]
        p = [float(p_full[row, i]) for i in keep]
        q = [float(q_full[row, i]) for i in keep]
        p.append(max(0.0, 1 - sum(p)))
        q.append(max(1e-12, 1 - sum(q)))
        out.append(sum(a * (torch.tensor(a).log() - torch.tensor(b).log()) for a, b in zip(p, q) if a > 0))
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_topk_kl_is_the_kl_of_the_coarsened_distributions(k):
    torch.manual_seed(k)
    V, N = 50, 7
    p_logits, q_logits = torch.randn(N, V) * 2, torch.randn(N, V) * 2
    log_p, log_q = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    top_lp, top_ids = log_p.topk(k, dim=-1)
    got = soft.topk_kl(log_q, top_ids, top_lp)
    want = coarse_kl_reference(log_p.exp(), log_q.exp(), top_ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert bool((got >= -1e-6).all())
    full = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert bool((got <= full + 1e-5).all())  # coarsening never adds divergence
    if k == V:
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-4)
    assert float(soft.topk_kl(log_p, top_ids, top_lp).abs().max()) < 1e-5  # q == p: zero


def test_topk_kl_with_a_draft_vocabulary():
    torch.manual_seed(0)
    V, N, K = 40, 6, 8
    draft_vocab = torch.tensor(sorted(torch.randperm(V)[:25].tolist()))
    log_p = F.log_softmax(torch.randn(N, V) * 2, -1)
    log_q_small = F.log_softmax(torch.randn(N, 25), -1)  # the draft only has its 25 tokens
    q_full = torch.zeros(N, V)
    q_full[:, draft_vocab] = log_q_small.exp()
    top_lp, top_ids = log_p.topk(K, dim=-1)
    index = soft.vocab_index(draft_vocab, V)
    got = soft.topk_kl(log_q_small, index[top_ids], top_lp)
    want = coarse_kl_reference(log_p.exp(), q_full, top_ids, vocab=set(draft_vocab.tolist()))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def fake_self_data(model, n=10, vocab=64, k=6, seed=0):
    """Sequences whose answers are the model's own greedy continuation, with its recorded top-k (what
    s2d_ext.train.self_data builds, without the chat template)."""
    g = torch.Generator().manual_seed(seed)
    tokens, offsets, starts, top_ids, top_lp, answer_offsets = [], [0], [], [], [], [0]
    with torch.no_grad():
        for i in range(n):
            prompt = torch.randint(2, vocab, (3 + i % 4,), generator=g)
            out = model.generate(prompt[None], max_new_tokens=4 + i % 5, do_sample=False, eos_token_id=None)
            seq = out[0]
            logits = model(seq[None]).logits[0, len(prompt) - 1 : -1]
            lp, ids = F.log_softmax(logits, -1).topk(k, dim=-1)
            tokens.append(seq)
            offsets.append(offsets[-1] + len(seq))
            starts.append(len(prompt))
            top_ids.append(ids)
            top_lp.append(lp)
            answer_offsets.append(answer_offsets[-1] + len(seq) - len(prompt))
    return SelfData(
        root=None,
        tokens=torch.cat(tokens),
        seq_offsets=torch.tensor(offsets),
        answer_start=torch.tensor(starts),
        answer_offsets=torch.tensor(answer_offsets),
        topk_ids=torch.cat(top_ids),
        topk_logprobs=torch.cat(top_lp),
        temperature=torch.zeros(n),
        finished=torch.zeros(n, dtype=torch.bool),
        prompts=[{"text": str(i)} for i in range(n)],
        manifest={},
    )


def test_self_data_batch_lines_up_labels_and_distributions():
    target = tiny_llama(num_layers=3)
    data = fake_self_data(target)
    batch = soft.self_data_batch(data, [4, 1, 7])
    flat = batch.input_ids.reshape(-1)
    assert torch.equal(flat[batch.positions + 1], batch.labels)  # each position predicts its label
    assert torch.equal(batch.topk_ids[:, 0], batch.labels)  # greedy answers: the recorded top-1
    width = batch.input_ids.shape[1]
    assert bool((batch.attention_mask.reshape(-1)[batch.positions + 1] == 1).all())
    answers = sum(len(data.sequence(i)) - int(data.answer_start[i]) for i in (4, 1, 7))
    assert batch.positions.numel() == answers
    assert batch.input_ids.shape[0] == 3 and width == max(len(data.sequence(i)) for i in (4, 1, 7))


def test_self_data_loss_matches_a_dense_computation():
    target = tiny_llama(num_layers=3)
    data = fake_self_data(target)
    draft = soft.cut_draft(target, 2, (1, 2))
    batch = soft.self_data_batch(data, [0, 3, 5])
    out = soft.self_data_loss(draft, batch, (1, 2), ce_weight=0.5, kl_weight=2.0)
    logits = soft.exit_logits(draft, batch.input_ids, batch.attention_mask, (1, 2))
    want = 0.0
    for lg in logits:
        lq = F.log_softmax(lg.reshape(-1, lg.shape[-1])[batch.positions], -1)
        ce = F.nll_loss(lq, batch.labels)
        kl = soft.topk_kl(lq, batch.topk_ids, batch.topk_logprobs).mean()
        want = want + 0.5 * (0.5 * ce + 2.0 * kl)
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=1e-5)
    # the full-depth draft is the target's first 2 of 3 layers: agreement is a fraction in [0, 1]
    assert bool(((out.agreement_per_exit >= 0) & (out.agreement_per_exit <= 1)).all())


def _train(model, data, steps, tmp_path=None, resume=False, **kw):
    # NOTE: a constant learning rate after warm-up, so that a run cut short (max_steps=5) and resumed
    # follows the same schedule as a run straight to the end (the cosine would depend on max_steps)
    cfg = soft.SoftConfig(
        exits=(1, 2), max_steps=steps, batch_size=3, lr=3e-3, warmup_steps=1, min_lr_ratio=1.0, seed=0
    )
    return soft.train_soft_self_data(
        model,
        data,
        cfg,
        train_indices=range(8),
        heldout_indices=[8, 9],
        out_dir=tmp_path,
        resume=resume,
        progress=False,
        **kw,
    )


def test_training_learns_keeps_the_shared_weights_and_resumes_exactly(tmp_path):
    target = tiny_llama(num_layers=3)
    data = fake_self_data(target)
    embed_before = target.get_input_embeddings().weight.clone()
    head_before = target.get_output_embeddings().weight.clone()
    draft = soft.cut_draft(target, 2, (1, 2))
    result = _train(draft, data, 12)
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < first["loss"]
    assert torch.equal(target.get_input_embeddings().weight, embed_before)
    assert torch.equal(target.get_output_embeddings().weight, head_before)

    # 12 steps straight == 5 steps, saved, then resumed to 12 (data order is a function of the step)
    straight = soft.cut_draft(tiny_llama(num_layers=3), 2, (1, 2))
    _train(straight, data, 12)
    half = soft.cut_draft(tiny_llama(num_layers=3), 2, (1, 2))
    _train(half, data, 5, tmp_path / "ckpt")
    resumed = soft.cut_draft(tiny_llama(num_layers=3), 2, (1, 2))
    out = _train(resumed, data, 12, tmp_path / "ckpt", resume=True)
    assert out.step == 12 and len(out.history) == 12
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    record = soft.read_training_record(tmp_path / "ckpt")
    assert record["step"] == 12 and record["evals"][0]["step"] == 0 and record["evals"][-1]["step"] == 12


def test_time_budget_stops_and_saves_resumably(tmp_path):
    target = tiny_llama(num_layers=3)
    data = fake_self_data(target)
    draft = soft.cut_draft(target, 2, (1, 2))
    out = _train(draft, data, 50, tmp_path / "ckpt", max_seconds=0.0)
    assert out.step == 0
    state = torch.load(tmp_path / "ckpt" / soft.STATE_FILE, weights_only=False)
    assert state["finished"] is False


def test_train_refuses_overlapping_heldout():
    target = tiny_llama(num_layers=3)
    data = fake_self_data(target)
    cfg = soft.SoftConfig(exits=(1, 2), max_steps=1, batch_size=2)
    with pytest.raises(ValueError, match="both trained on and held out"):
        soft.train_soft_self_data(
            soft.cut_draft(target, 2, (1, 2)), data, cfg, train_indices=[0, 1], heldout_indices=[1]
        )


def test_answer_tokens_are_the_answers_of_the_chosen_rows():
    data = fake_self_data(tiny_llama(), n=5)
    rows = [3, 0]
    want = []
    for i in rows:
        start, end = int(data.seq_offsets[i]) + int(data.answer_start[i]), int(data.seq_offsets[i + 1])
        want += data.tokens[start:end].tolist()
    got = data.answer_tokens(rows)
    assert got.dtype == torch.int64 and got.tolist() == want
    # one answer token per recorded distribution row, over all rows
    assert data.answer_tokens(range(5)).numel() == data.num_answer_tokens
    assert data.answer_tokens([]).numel() == 0
