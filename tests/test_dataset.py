"""Batches of captions and what the model learns from them: collate, and the targets of forward."""
import dataclasses
import glob
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dataset import _shuffled_chunks, read_order, train_val_splits
from model import AttentionModel, CaptionModel, UpDownModel


def test_collate_pads_ends_and_keeps_each_caption_with_its_own_image(demo):
    train, _ = train_val_splits(demo)
    pairs = [train.pairs[13], train.pairs[0], train.pairs[7], train.pairs[200]]  # rows out of order
    rows, features, captions, lengths = train.collate(pairs)
    assert rows.tolist() == [row for row, _ in pairs]
    assert captions.shape == (4, int(lengths.max()))
    for b, (row, number) in enumerate(pairs):
        words = train.word_captions()[row][number]
        assert lengths[b] == len(words) + 1
        assert captions[b, :lengths[b]].tolist() == words + [train.end]
        assert captions[b, lengths[b]:].eq(0).all()  # </PAD>
        assert torch.equal(features[b].float(), train.features_of([row])[0])
    assert not torch.equal(features[0], features[1])  # different images really are different rows


def with_extra_text(demo, folder):
    """The demo's training data with extra text (row % 3 captions of words 5 6 7 a row) in folder
    -> (its options, the caption data)."""
    data = torch.load(demo.caption_data_path, weights_only=True)
    data["extra_caption"] = [[[5, 6, 7]] * (row % 3) for row in range(len(data["ix2id"]))]
    torch.save(data, folder / "caption.pth")
    stem = os.path.splitext(demo.caption_data_path)[0]
    for path in glob.glob(stem + ".features.*") + glob.glob(stem + ".regions.*"):
        shutil.copy(path, folder / os.path.basename(path))
    return dataclasses.replace(demo, caption_data_path=str(folder / "caption.pth")), data


def test_training_reads_the_extra_text_and_validation_never_does(demo, tmp_path):
    """--val-fraction takes validation images from the training file: their extra text stays out."""
    opt, data = with_extra_text(demo, tmp_path)
    train, val = train_val_splits(dataclasses.replace(opt, val_caption_data_path="", val_fraction=0.25))
    assert len(train.pairs) == sum(len(data["caption"][row]) + row % 3 for row in train.rows)
    assert len(val.pairs) == sum(len(data["caption"][row]) for row in val.rows)
    row = next(row for row in train.rows if row % 3 == 2)
    assert train.training_text(row)[-1] == "".join(data["ix2word"][ix] for ix in (5, 6, 7))
    assert train.references([row]) == {data["ix2id"][row]: data["sentences"][row]}


def tiny_model(kind):
    """A small model of the kind without dropout, and features for 3 images."""
    torch.manual_seed(0)
    if kind == "pooled":
        return CaptionModel(11, 5, embedding_dim=6, hidden_size=8, num_layers=2, dropout=0).eval(), torch.randn(3, 5)
    if kind == "updown":
        model = UpDownModel(11, 5, embedding_dim=6, hidden_size=8, attention_dim=7, dropout=0)
        return model.eval(), torch.randn(3, 4, 5)
    model = AttentionModel(11, 5, embedding_dim=6, hidden_size=8, attention_dim=7, dropout=0, alpha_c=1.0)
    return model.eval(), torch.randn(3, 4, 5)  # 4 regions


CAPTIONS = torch.tensor([[4, 5, 6, 1, 0], [7, 1, 0, 0, 0], [3, 9, 8, 10, 1]])  # (B, T), </EOS> = 1
LENGTHS = torch.tensor([4, 2, 5])


def stepwise_loss(model, features, own_words):
    """Summed loss of the captions decoded one step at a time: each next input is the human word,
    or with own_words the model's best word."""
    loss = 0.0
    for b in range(3):
        inputs, state = model.start(features[b:b + 1])
        for t in range(int(LENGTHS[b])):
            log_probs, state = model.step(inputs, state)
            loss -= log_probs[0, CAPTIONS[b, t]].item()
            inputs = model.embed(log_probs.argmax(-1) if own_words else CAPTIONS[b, t:t + 1])
    return loss


@pytest.mark.parametrize("kind", ["pooled", "attention", "updown"])
def test_forward_predicts_each_word_from_the_words_before_it(kind):
    """forward's packed logits/targets give the same loss as teacher-forced decoding step by step:
    the image predicts word 1, word t predicts word t+1, the last word predicts </EOS>."""
    model, features = tiny_model(kind)
    with torch.no_grad():
        logits, targets, _ = model(features, CAPTIONS, LENGTHS)
        packed_loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        teacher_loss = stepwise_loss(model, features, own_words=False)
    assert sorted(targets.tolist()) == sorted(CAPTIONS[CAPTIONS > 0].tolist())
    np.testing.assert_allclose(packed_loss.item(), teacher_loss, rtol=1e-5)


def test_attention_penalty_is_zero_when_every_region_is_looked_at_once():
    """alpha_c * mean over regions of (1 - sum over words of the weights)^2, words after </EOS> left out."""
    model = AttentionModel(vocab_size=11, feature_dim=5, embedding_dim=6, hidden_size=8, attention_dim=7,
                           dropout=0, alpha_c=2.0)
    captions, lengths = torch.tensor([[4, 5, 6, 1], [7, 1, 0, 0]]), torch.tensor([4, 2])
    with torch.no_grad():
        model.attention_score.weight.zero_()  # equal weights: 1/4 per region and word
        model.attention_score.bias.zero_()
        _, _, penalty = model(torch.randn(2, 4, 5), captions, lengths)
    # image 1: 4 words x 1/4 = 1 per region -> 0; image 2: 2 words x 1/4 -> (1 - 0.5)^2 = 0.25
    assert penalty.item() == pytest.approx(2.0 * (0 + 0.25) / 2)


@pytest.mark.parametrize("kind", ["pooled", "attention", "updown"])
def test_scheduled_sampling_feeds_the_models_own_best_word(kind):
    """At probability 1 every input after the first is the model's best word of the step before:
    the loss is that of greedy decoding scored against the human captions. At 0 it is teacher forcing."""
    model, features = tiny_model(kind)
    with torch.no_grad():
        logits, targets, _ = model(features, CAPTIONS, LENGTHS, sampling=1.0)
        own_loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        greedy_loss = stepwise_loss(model, features, own_words=True)
        teacher, _, _ = model(features, CAPTIONS, LENGTHS)
        unrolled, _, _ = model.unrolled(features, CAPTIONS, LENGTHS, sampling=0.0)
    np.testing.assert_allclose(own_loss, greedy_loss, rtol=1e-5)
    torch.testing.assert_close(unrolled, teacher)  # the step-by-step path is the packed one when not sampling
    teacher_loss = torch.nn.functional.cross_entropy(teacher, targets, reduction="sum").item()
    assert abs(teacher_loss - own_loss) > 1e-3


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 4), min_size=1, max_size=60), block=st.integers(1, 9),
       seed=st.integers(0, 2 ** 31 - 1))
def test_a_read_order_is_a_permutation_keeping_each_block_together(counts, block, seed):
    """Items of rows (each row's count of captions, some rows missing): every item once; with block > 1
    the items of each block of rows r // block come one after another; block 1 is the old shuffle."""
    rows = np.repeat(np.arange(len(counts)), counts)
    order = read_order(rows, seed, block)
    assert sorted(order.tolist()) == list(range(len(rows)))
    blocks = rows[order] // block
    if block > 1:  # no block comes back later
        assert len(set(blocks.tolist())) == np.count_nonzero(np.diff(blocks)) + (len(rows) > 0)
    else:
        expected = np.arange(len(rows))
        np.random.default_rng(seed).shuffle(expected)
        assert np.array_equal(order, expected)


def test_read_block_batches_cover_every_caption_once_from_few_blocks(demo):
    train, _ = train_val_splits(demo)
    batches = list(train.batches(40, seed=3, block=8))
    rows = np.concatenate([rows for rows, *_ in batches])
    assert sorted(zip(rows.tolist())) == sorted((row,) for row, _ in train.pairs)
    for batch_rows, *_ in batches[:-1]:
        assert len(set((batch_rows // 8).tolist())) <= 40 // 5 // 8 + 3  # ~one block of 8 photos, 5 captions each
    assert len(set((batches[0][0] // 8).tolist())) < len(set(next(train.batches(40, seed=3))[0].tolist()))


def test_under_torchrun_a_block_batch_is_shared_in_stretches_and_a_random_one_dealt_out():
    """Each of 3 processes takes a stretch of a --read-block batch (its runs stay runs); without blocks
    every 3rd item, as before. Either way the shares make up the batch."""
    rows = np.repeat(np.arange(50), 5)
    for block in (1, 8):
        whole = list(_shuffled_chunks(rows, 40, 7, 0, block=block))
        shares = [list(_shuffled_chunks(rows, 40, 7, 0, process, 3, block)) for process in range(3)]
        for number, batch in enumerate(whole):
            parts = [share[number] for share in shares]
            assert np.array_equal(np.concatenate(parts) if block > 1 else np.sort(np.concatenate(parts)),
                                  batch if block > 1 else np.sort(batch))
            if block == 1:
                assert np.array_equal(parts[1], batch[1::3])
