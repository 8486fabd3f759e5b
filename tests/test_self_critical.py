"""Self-critical training: its CIDEr-D reward, that it learns what the reward asks, and its phase of training."""
import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import torch
from conftest import options
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs
from test_ensemble import three_models
from torch.nn.utils.rnn import pack_padded_sequence

from beam_search import beam_search
from config import UserError
from main import train
from model import CaptionModel, load_checkpoint
from self_critical import (
    CorpusCider,
    Frequencies,
    ReferenceCorpus,
    Reward,
    draw,
    log_probabilities,
    sample,
    self_critical_loss,
    sentence,
    training_cider,
)
from trainer import Trainer

REFERENCES = {
    "a": ["一只 狗 在 草地 上 奔跑", "草地 上 的 狗", "奔跑 的 黑狗"],
    "b": ["两个 孩子 在 海边 玩", "海边 的 孩子", "孩子 在 玩 沙子"],
    "c": ["一个 男人 在 骑 自行车", "骑车 的 男人", "男人 骑 自行车 在 路上"],
}


def test_corpus_cider_is_the_library_cider_when_the_corpus_is_the_scored_set():
    candidates = {"a": "狗 在 草地 上", "b": "一个 男人 在 海边", "c": "男人 骑 自行车"}
    _, expected = Cider().compute_score(REFERENCES, {key: [text] for key, text in candidates.items()})
    scores = CorpusCider(REFERENCES).score(list(candidates), list(candidates.values()))
    np.testing.assert_allclose(scores, expected)
    assert scores[2] > scores[1] > 0  # a good caption beats a poor one


def test_corpus_cider_keeps_the_corpus_document_frequencies_for_a_batch():
    cider = CorpusCider(REFERENCES)
    alone = cider.score(["a"], ["狗 在 草地 上"])
    together = cider.score(["a", "b", "a"], ["狗 在 草地 上", "海边 的 孩子", "狗 在 草地 上"])
    np.testing.assert_allclose([alone[0], alone[0]], together[[0, 2]])
    known = len(cider.document_frequency)
    cider.score(["a"], ["从未 见过 的 词语 组合"])
    assert len(cider.document_frequency) == known and cider.document_frequency[("从未",)] == 0  # never stored


def library_frequencies(corpus):
    """pycocoevalcap's own document frequencies of a corpus {key: [sentences]}."""
    scorer = CiderScorer()
    scorer.crefs = [cook_refs(refs) for refs in corpus.values()]
    scorer.compute_doc_freq()
    return scorer.document_frequency


WORDS = ["一只", "狗", "在", "草地", "上", "奔跑", "猫", "的", "人", "海边", "玩", "x"]


@settings(max_examples=40, deadline=None)
@given(corpus=st.dictionaries(st.integers(0, 50), st.lists(st.lists(st.sampled_from(WORDS), max_size=9).map(" ".join),
                                                           min_size=1, max_size=5), min_size=1),
       word_bits=st.sampled_from([3, 15]))
def test_the_frequencies_are_pycocoevalcaps_and_rare_words_past_the_numbers_share_one(corpus, word_bits):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Frequencies, "WORD_BITS", word_bits)
        expected, frequencies = library_frequencies(corpus), Frequencies.build(corpus)
        numbered = set(frequencies.words[:2 ** word_bits - 2])  # the words with a number of their own
        for ngram, count in expected.items():
            if set(ngram) <= numbered:
                assert frequencies[ngram] == count
            else:  # counted with the other n-grams of its shape that differ only in rare words
                assert frequencies[ngram] >= count
        assert frequencies[("从未",)] == 0 and frequencies[("狗", "从未")] == 0
        if word_bits == 15:
            assert len(frequencies) == len(expected)


def test_the_training_frequencies_are_counted_once_and_a_changed_or_damaged_file_is_counted_again(tmp_path,
                                                                                                 monkeypatch, capsys):
    caption_file, captions = str(tmp_path / "train.pth"), {0: [[5, 6, 7]], 1: [[5, 8], [9]]}
    first = training_cider(caption_file, captions, end=1, unknown=2)
    saved = tmp_path / "train.cider.pth"
    assert saved.is_file()
    monkeypatch.setattr(Frequencies, "build", lambda corpus: pytest.fail("counted again"))
    again = training_cider(caption_file, captions, end=1, unknown=2)
    assert again.score([0], ["5 6 7 1"]) == pytest.approx(first.score([0], ["5 6 7 1"]))
    monkeypatch.undo()
    changed = training_cider(caption_file, {**captions, 2: [[6, 6]]}, end=1, unknown=2)
    assert "counts other captions than these; counting them again" in capsys.readouterr().out
    assert changed.document_frequency[("6", "6")] == 1
    saved.write_bytes(saved.read_bytes()[:100])  # cut short
    training_cider(caption_file, captions, end=1, unknown=2)
    assert "train.cider.pth: unreadable" in capsys.readouterr().out
    assert training_cider(caption_file, captions, end=1, unknown=2).document_frequency[("6", "6")] == 0


def test_bleu_weight_adds_the_mean_bleu_to_the_reward():
    cider = CorpusCider(REFERENCES)
    keys, candidates = ["a", "b", "c"], ["一只 狗 在 草地 上 奔跑", "狗 跑", ""]
    plain, mixed = Reward(cider)(keys, candidates), Reward(cider, bleu_weight=2.0)(keys, candidates)
    np.testing.assert_allclose(mixed[0] - plain[0], 2.0, rtol=1e-6)  # a reference itself: every BLEU is 1
    np.testing.assert_allclose(mixed[1:] - plain[1:], 0.0, atol=1e-6)  # no shared word, or no word at all


def test_the_diversity_weight_takes_from_a_sample_what_it_shares_with_its_images_other_samples():
    """Image a's first two samples repeat each other; its third and image b's three share no word."""
    cider = CorpusCider(REFERENCES)
    keys = ["a"] * 3 + ["b"] * 3
    candidates = ["狗 在 草地 上", "狗 在 草地 上", "奔跑 的 黑狗", "两个 孩子", "海边 的 沙子", "在 玩"]
    plain, varied = Reward(cider)(keys, candidates, 3), Reward(cider, diversity_weight=0.5)(keys, candidates, 3)
    penalty = plain - varied
    repeated = cider.score_against([["狗 在 草地 上", "奔跑 的 黑狗"]], ["狗 在 草地 上"])[0]
    np.testing.assert_allclose(penalty[:2], 0.5 * repeated, rtol=1e-6)
    assert repeated > 1.0
    np.testing.assert_allclose(penalty[2:], 0.0, atol=1e-9)  # no n-gram in common with the image's others


def test_without_scst_dropout_the_model_samples_and_learns_in_eval_mode(demo, tmp_path, monkeypatch):
    modes = []
    self_critical_step = Trainer.self_critical_step

    def record_mode(self, batch):
        modes.append(self.model.training)
        return self_critical_step(self, batch)

    monkeypatch.setattr(Trainer, "self_critical_step", record_mode)
    run = options(demo, tmp_path, epoch=1, scst_epoch=1, eval_size=0, metric="val_loss", plot_every=1)
    train(**{**run, "scst_dropout": False})
    train(**{**run, "overwrite": True})
    batches = len(modes) // 2
    assert batches and modes == [False] * batches + [True] * batches


def test_sentence_keeps_the_end_token_and_stops_there():
    assert sentence([5, 7, 1, 9], end=1) == "5 7 1"
    assert sentence([5, 7], end=1) == "5 7"  # ran out of length: no end


def test_the_reward_sees_where_a_caption_ends():
    """The references end with </EOS> (1): a caption that ends after the words they end on earns more
    than the same words cut off by the length limit, or than a fragment that stops on 3 (一个)."""
    corpus = {0: [[3, 4, 5], [3, 4, 6, 5]], 1: [[7, 8], [8, 9]], 2: [[9, 7, 8]]}
    cider = CorpusCider(ReferenceCorpus(corpus, end=1, unknown=2))
    ended, cut_off, fragment = cider.score([0] * 3, [sentence(c, 1) for c in ([3, 4, 5, 1], [3, 4, 5], [4, 5, 3, 1])])
    assert ended > cut_off and ended > fragment


def test_samples_never_end_on_an_unfinished_word():
    """3 is near-certainly followed by </EOS> (1); with 3 unfinished no sample ends right after it."""
    torch.manual_seed(0)
    model = CaptionModel(vocab_size=6, feature_dim=4, embedding_dim=8, hidden_size=8, num_layers=1, dropout=0.0)
    with torch.no_grad():
        model.classifier.bias[3] += 4.0
        model.classifier.bias[1] += 4.0
    free, _ = sample(model, torch.randn(8, 4), end=1, banned=[0, 2], max_len=6, samples=8)
    ruled, mask = sample(model, torch.randn(8, 4), end=1, banned=[0, 2], max_len=6, samples=8, unfinished=[3])
    def ends_on_3(words):
        return sum(row[i] == 1 and i and row[i - 1] == 3 for row in words.tolist() for i in range(len(row))
                   if 1 not in row[:i])
    assert ends_on_3(free) > 10 and ends_on_3(ruled) == 0


def test_an_unknown_word_in_a_reference_is_never_rewarded():
    cider = CorpusCider(ReferenceCorpus({0: [[5, 2, 7]], 1: [[8, 9]]}, end=1, unknown=2))
    with_unknown, without = cider.score([0, 0], ["5 2 7", "5 7"])
    assert without > with_unknown


def test_self_critical_steps_teach_each_image_its_own_caption():
    """Two images, each with one reference: the reward alone leads greedy decoding to that reference."""
    torch.manual_seed(0)
    end, references = 1, {0: [[3, 4, 5]], 1: [[6, 7]]}
    cider = CorpusCider({key: [sentence(ref, end) for ref in refs] for key, refs in references.items()})
    model = CaptionModel(vocab_size=8, feature_dim=4, embedding_dim=16, hidden_size=32, num_layers=1, dropout=0.0)
    features = torch.eye(4)[:2]  # (2, 4): one distinct feature per image
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    rewards = []
    for _ in range(150):
        loss, reward = self_critical_loss(model, features, [0, 1], Reward(cider), end, [], samples=8, max_len=6)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rewards.append(reward)
    assert np.mean(rewards[-10:]) > 5 * max(np.mean(rewards[:10]), 0.1)
    greedy = [beams[0][0] for beams in beam_search(model.eval(), features, end, beam_size=1, max_len=6)]
    assert greedy == [[3, 4, 5], [6, 7]]


def test_one_sample_per_image_is_refused(demo, tmp_path):
    with pytest.raises(UserError, match=r"--scst-samples=1: must be in \[2, 1024\]"):
        Trainer(dataclasses.replace(demo, scst_epoch=1, scst_samples=1, log_dir=str(tmp_path)))


def test_self_critical_phase_starts_from_the_best_model_and_logs_rewards(demo, tmp_path, monkeypatch):
    """Epoch 1 is best, epoch 2 worse: self-critical training must start from epoch 1's weights."""
    cider = iter([0.5, 0.1, 0.2, 0.6])
    monkeypatch.setattr(Trainer, "validate", lambda self: {"val_loss": 1.0, "CIDEr-D": next(cider)})
    starts = []

    def start_and_record(self, phase):
        start_phase(self, phase)
        best = load_checkpoint(self.checkpoints.best)["model"]
        starts.append(all(torch.equal(value, best[key]) for key, value in self.model.state_dict().items()))

    start_phase = Trainer.start_phase
    monkeypatch.setattr(Trainer, "start_phase", start_and_record)
    train(**options(demo, tmp_path, epoch=2, scst_epoch=2, scst_lr=1e-4, plot_every=1))
    assert starts == [True]
    log = [json.loads(line) for line in open(tmp_path / "logs" / "caption.metrics.jsonl")]
    assert {r["epoch"] for r in log if r["name"] == "train_loss"} == {0, 1}
    rewards = [r["value"] for r in log if r["name"] == "train_reward"]
    assert {r["epoch"] for r in log if r["name"] == "train_reward"} == {2, 3}
    assert rewards and all(np.isfinite(value) and value >= 0 for value in rewards)
    best = load_checkpoint(str(tmp_path / "checkpoints" / "best.pth"))
    last = load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))
    assert best["state"]["epoch"] == 4 and last["state"]["epoch"] == 4
    assert last["optimizer"]["param_groups"][0]["lr"] == 1e-4  # the self-critical optimizer
    cross_entropy = load_checkpoint(str(tmp_path / "checkpoints" / "best-cross-entropy.pth"))  # kept for ensembles
    assert cross_entropy["state"]["phase"] == "cross-entropy" and cross_entropy["state"]["epoch"] <= 2


def test_ctrl_c_in_self_critical_training_resumes_there(demo, tmp_path, monkeypatch):
    """Ctrl-C in the second self-critical batch; --resume runs the rest of that epoch, every image once."""
    batch_sizes = []
    self_critical_step = Trainer.self_critical_step

    def step_then_interrupt(self, batch):
        batch_sizes.append(len(batch.rows))
        if len(batch_sizes) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return self_critical_step(self, batch)

    monkeypatch.setattr(Trainer, "self_critical_step", step_then_interrupt)
    run = options(demo, tmp_path, epoch=1, scst_epoch=1, scst_lr=1e-4, eval_size=0, metric="val_loss")
    train(**run)
    saved = load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))
    assert (saved["state"]["epoch"], saved["state"]["batch"]) == (1, 2)
    assert saved["optimizer"]["param_groups"][0]["lr"] == 1e-4
    train(**{**run, "resume": True})
    assert sum(batch_sizes) == 120  # the demo's training images, each once
    assert load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))["state"]["epoch"] == 2


@torch.no_grad()
def test_sampling_never_emits_padding_or_unknown():
    torch.manual_seed(0)
    model = CaptionModel(vocab_size=8, feature_dim=4, embedding_dim=6, hidden_size=8, num_layers=1, dropout=0.0)
    model.classifier.bias[[0, 2]] += 5.0  # </PAD> and </UNKNOWN> are the model's favourite words
    words, mask = sample(model, torch.randn(200, 4), end=1, banned=[0, 2], max_len=8)
    emitted = words[mask]
    assert len(emitted) >= 200 and not ((emitted == 0) | (emitted == 2)).any()


@pytest.mark.parametrize("kind", ["pooled", "attention", "transformer"])
def test_the_parallel_log_probabilities_of_the_samples_are_those_of_their_steps(kind):
    """What the loss differentiates, in one teacher-forced pass, is what the model said step by step."""
    members, _, _ = three_models()
    model, features = {"pooled": members[0], "attention": members[1], "transformer": members[2]}[kind]
    torch.manual_seed(0)
    words, mask = sample(model, features, end=1, banned=[0, 2], max_len=6, samples=3)  # (9, T)
    lengths = mask.sum(1)
    parallel = log_probabilities(model, features, words, lengths, [0, 2], samples=3)  # (K,) packed
    inputs, state = model.start(features.repeat_interleave(3, 0))
    stepped = []
    for t in range(words.size(1)):
        log_probs, state = model.step(inputs, state, torch.tensor([0, 2]))
        stepped.append(log_probs.gather(1, words[:, t:t + 1]).squeeze(1))
        inputs = model.embed(words[:, t])
    stepped = pack_padded_sequence(torch.stack(stepped, 1), lengths, batch_first=True, enforce_sorted=False).data
    assert len(parallel) == int(lengths.sum()) > 9
    torch.testing.assert_close(parallel, stepped, atol=1e-5, rtol=0)


def test_drawn_words_follow_their_probabilities_and_never_one_of_probability_zero():
    torch.manual_seed(0)
    probabilities = torch.tensor([[0.0, 0.1, 0.6, 0.0, 0.3], [0.5, 0.0, 0.0, 0.5, 0.0]]).repeat(50_000, 1)
    words = draw(probabilities).view(-1, 2)
    for row, expected in enumerate(probabilities[:2]):
        share = torch.bincount(words[:, row], minlength=5) / len(words)
        torch.testing.assert_close(share, expected, atol=0.01, rtol=0)
        assert (share[expected == 0] == 0).all()


def test_ctrl_c_during_the_validation_that_ends_a_phase_stops_and_resumes_into_the_next(demo, tmp_path, monkeypatch):
    """Epoch 2 stalls (early stop) while Ctrl-C arrives: the run stops there; --resume starts self-critical."""
    scores, phases_trained = iter([0.5, 0.1, 0.2]), []

    def validate_then_interrupt(self):
        if self.progress.epoch == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return {"val_loss": 1.0, "CIDEr-D": next(scores)}

    train_epoch = Trainer.train_epoch
    monkeypatch.setattr(Trainer, "validate", validate_then_interrupt)
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, stop: phases_trained.append(self.progress.phase)
                        or train_epoch(self, stop))
    run = options(demo, tmp_path, epoch=4, early_stop_patience=1, lr_patience=0, scst_epoch=1, scst_lr=1e-4)
    train(**run)
    last = tmp_path / "checkpoints" / "last.pth"
    assert phases_trained == ["cross-entropy"] * 2
    assert (load_checkpoint(str(last))["state"]["phase"], load_checkpoint(str(last))["state"]["epoch"]) == (
        "cross-entropy", 2)
    train(**{**run, "resume": True})
    assert phases_trained == ["cross-entropy"] * 2 + ["self-critical"]  # no third cross-entropy epoch
    assert load_checkpoint(str(last))["state"]["epoch"] == 3
