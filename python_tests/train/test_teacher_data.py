"""teacher_data: standard-library windows scored by several teachers; deterministic, resumable, checked;
the SoFT loss distils toward the teachers' mean; and the CLI's --teacher-data path end to end."""

from __future__ import annotations

import pytest
import torch

from python_tests.train.conftest import tiny_llama
from s2d_ext.cli import main
from s2d_ext.train import self_data, teacher_data
from s2d_ext.train.self_data.cache import sha256_file
from s2d_ext.train.soft.self_data_loss import self_data_batch, self_data_loss, topk_kl


def small_spec(**kw):
    return teacher_data.TeacherDataSpec(
        name="tiny",
        max_tokens=5 * 16,
        seq_len=16,
        windows_per_file=1,
        top_k=4,
        shard_size=2,
        batch_size=2,
        **kw,
    )


@pytest.fixture
def teachers(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    return {
        "small": tiny_llama(num_layers=2, vocab_size=vocab, seed=1),
        "large": tiny_llama(num_layers=3, vocab_size=vocab, hidden_size=48, seed=2),
    }


def _digests(root):
    return {
        p.name: sha256_file(p) for p in sorted(root.iterdir()) if p.is_file() and p.name != "manifest.json"
    }


def test_build_scores_every_window_with_every_teacher(tmp_path, tiny_tokenizer, teachers):
    spec = small_spec()
    fps = {"small": "a", "large": "b"}
    shards = teacher_data.build_teacher_data(teachers, tiny_tokenizer, spec, fps, tmp_path, progress=False)
    root = teacher_data.teacher_data_dir("tiny", tmp_path)
    assert shards == ["answers_00000.safetensors", "answers_00001.safetensors", "answers_00002.safetensors"]
    data = self_data.load_self_data(root)
    windows = teacher_data.source_windows(tiny_tokenizer, spec)
    assert data.num_sequences == spec.num_windows == 5
    assert data.topk_ids.shape == (5 * 15, 2, 4) and data.topk_logprobs.shape == (5 * 15, 2, 4)
    for i, window in enumerate(windows):
        assert data.sequence(i).tolist() == window["ids"]
        assert int(data.answer_start[i]) == 1
        rows = slice(int(data.answer_offsets[i]), int(data.answer_offsets[i + 1]))
        for m, model in enumerate(teachers.values()):
            ids, lp = teacher_data.teacher_topk(model, torch.tensor([window["ids"]]), 4)
            assert torch.equal(data.topk_ids[rows, m], ids[0].long())
            assert torch.allclose(data.topk_logprobs[rows, m], lp[0])
    assert [p["source"] for p in data.prompts] == ["stdlib"] * 5


def test_resumes_rebuilds_damage_and_keys_on_teachers(tmp_path, tiny_tokenizer, teachers):
    spec = small_spec()
    fps = {"small": "a", "large": "b"}
    teacher_data.build_teacher_data(teachers, tiny_tokenizer, spec, fps, tmp_path / "a", progress=False)
    a = teacher_data.teacher_data_dir("tiny", tmp_path / "a")

    class Stop(Exception):
        pass

    def stop(name):
        if name == "answers_00001.safetensors":
            raise Stop

    with pytest.raises(Stop):
        teacher_data.build_teacher_data(
            teachers, tiny_tokenizer, spec, fps, tmp_path / "b", progress=False, on_file=stop
        )
    # a time budget that is spent: the shards built so far, and a partial set that loads
    built = teacher_data.build_teacher_data(
        teachers, tiny_tokenizer, spec, fps, tmp_path / "b", progress=False, max_seconds=1e-9
    )
    assert built == ["answers_00000.safetensors", "answers_00001.safetensors"]  # the interrupted run's
    partial = self_data.load_self_data(teacher_data.teacher_data_dir("tiny", tmp_path / "b"), shards=built)
    assert partial.num_sequences == len(partial.prompts) == 4
    written = []
    teacher_data.build_teacher_data(
        teachers, tiny_tokenizer, spec, fps, tmp_path / "b", progress=False, on_file=written.append
    )
    b = teacher_data.teacher_data_dir("tiny", tmp_path / "b")
    assert "answers_00000.safetensors" not in written and _digests(a) == _digests(b)
    shard = a / "answers_00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    written.clear()
    teacher_data.build_teacher_data(
        teachers, tiny_tokenizer, spec, fps, tmp_path / "a", progress=False, on_file=written.append
    )
    assert written == ["answers_00002.safetensors"] and _digests(a) == _digests(b)
    assert spec.fingerprint(fps) != spec.fingerprint({"small": "a", "large": "c"})
    with pytest.raises(ValueError, match="same teachers"):
        teacher_data.build_teacher_data(
            teachers, tiny_tokenizer, spec, {"small": "a"}, tmp_path, progress=False
        )


def test_loss_distils_toward_the_mean_of_the_teachers(tmp_path, tiny_tokenizer, teachers):
    spec = small_spec()
    teacher_data.build_teacher_data(
        teachers, tiny_tokenizer, spec, {"small": "a", "large": "b"}, tmp_path, progress=False
    )
    data = self_data.load_self_data(teacher_data.teacher_data_dir("tiny", tmp_path))
    draft = tiny_llama(num_layers=2, vocab_size=len(tiny_tokenizer), seed=3)
    batch = self_data_batch(data, [0, 1])
    out = self_data_loss(draft, batch, exits=(2,), ce_weight=0.0)
    with torch.no_grad():
        logits = draft(batch.input_ids, attention_mask=batch.attention_mask).logits
    log_q = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[batch.positions].float(), -1)
    per_teacher = [topk_kl(log_q, batch.topk_ids[:, m], batch.topk_logprobs[:, m]).mean() for m in range(2)]
    assert torch.allclose(out.loss, sum(per_teacher) / 2, atol=1e-5)
    agree = [(log_q.argmax(-1) == batch.topk_ids[:, m, 0]).float().mean() for m in range(2)]
    assert torch.allclose(out.agreement_per_exit[0], sum(agree) / 2)


def test_cli_teacher_data_end_to_end_and_refusals(tmp_path, tiny_checkpoint, tiny_tokenizer, capsys):
    other = tmp_path / "other"
    tiny_llama(num_layers=2, vocab_size=len(tiny_tokenizer), seed=4).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    argv = [
        "soft", "--base", str(tiny_checkpoint), "--teacher-data", "t",
        "--teachers", f"{tiny_checkpoint},{other}", "--teacher-tokens", "64", "--seq-len", "16",
        "--teacher-data-dir", str(tmp_path / "td"), "--exits", "2,3", "--steps", "2", "--batch-size", "2",
        "--heldout", "1", "--out", str(tmp_path / "draft"), "--no-progress", "--threads", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    assert "held-out top-1 agreement" in capsys.readouterr().out
    assert (tmp_path / "draft" / "config.json").is_file()
    data = self_data.load_self_data(tmp_path / "td" / "t")
    assert data.topk_ids.shape[1] == 2
    # a teacher with another vocabulary
    wide = tmp_path / "wide"
    tiny_llama(num_layers=2, vocab_size=len(tiny_tokenizer) + 8, seed=5).save_pretrained(wide)
    bad = list(argv)
    bad[bad.index("--teachers") + 1] = str(wide)
    bad[bad.index("--teacher-data") + 1] = "t2"
    bad[bad.index("--out") + 1] = str(tmp_path / "draft2")
    assert main(bad) == 1
    assert "vocabulary" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["soft", "--base", str(tiny_checkpoint), "--teachers", str(other), "--data", "x", "--out", "o"])
    assert "--teachers needs --teacher-data" in capsys.readouterr().err
