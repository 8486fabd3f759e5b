"""The retrieval model that measures how specific captions are: its loss, that a trained one finds a
caption's photo, its checkpoint, and evaluate's caption->photo recall for a model's and people's captions."""
import json

import numpy as np
import pytest
import torch
from conftest import options

import retrieval
from config import UserError
from dataset import load_split
from main import evaluate, generate, train
from main import retrieval as train_retrieval
from self_critical import Discriminability


def test_the_loss_counts_the_hardest_negative_past_the_margin_only():
    photos = torch.eye(3)
    assert retrieval.hardest_negative_loss(photos, photos).item() == 0  # each pair 1 above the others: past 0.2
    captions = torch.tensor([[1.0, 0.0, 0.0], [0.95, 0.31, 0.0], [0.0, 0.0, 1.0]])
    # photo 0: its caption 1.0, caption 1 at 0.95 -> 0.15; photo 1: caption 1 at 0.31 against caption 0 at 0.0 ->
    # no hinge; caption 1 against photo 0 (0.95 vs 0.31) -> 0.84; caption 0 against photo 1: 0 vs 1 -> none
    assert retrieval.hardest_negative_loss(photos, captions).item() == pytest.approx(0.15 + 0.84, abs=1e-5)
    assert retrieval.hardest_negative_loss(photos, captions, hardest=False).item() == pytest.approx(0.99, abs=1e-5)


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("retrieval") / "retrieval.pth")
    train_retrieval(**options(demo, retrieval_ckpt=path, retrieval_epoch=12, batch_size=32, lr=2e-3))
    return path


@pytest.fixture(scope="module")
def captioner(demo, tmp_path_factory):
    """A pooled captioner of the demo data, its checkpoint folder and logs under one folder."""
    folder = tmp_path_factory.mktemp("captioner")
    train(**options(demo, folder, epoch=1, eval_size=0, metric="val_loss"))
    return folder


def test_a_trained_model_finds_the_photo_a_caption_describes(demo, trained):
    model = retrieval.load(trained)
    data, features, _, rows = load_split(demo.val_caption_data_path)
    photos = torch.from_numpy(np.asarray(features[rows], dtype=np.float32))
    own = model.ranks([data["sentences"][row][0] for row in rows], photos).float()
    shuffled = model.ranks([data["sentences"][row][0] for row in np.roll(rows, 7)], photos).float()
    assert own.mean() < 0.5 * shuffled.mean()  # a caption of the photo's shape and colour ranks it near the top
    assert retrieval.recall(own)["R@5"] > 5 / len(rows) * 2  # at least twice chance


def test_the_epoch_kept_is_chosen_on_the_first_eval_size_val_photos_only(demo, tmp_path, capsys):
    path = str(tmp_path / "retrieval.pth")
    train_retrieval(**options(demo, retrieval_ckpt=path, retrieval_epoch=2, batch_size=32, eval_size=4))
    scores = [line.split("R@1 ")[1] for line in capsys.readouterr().out.splitlines() if "R@1 " in line]
    assert len(scores) == 3 and all("among the first 4 val photos" in score for score in scores[:2])
    assert all(float(score.split()[0]) in (0, 0.25, 0.5, 0.75, 1) for score in scores)  # shares of 4 photos
    assert retrieval.load(path)  # kept


def test_its_checkpoint_is_checked_and_not_taken_for_a_captioner(demo, trained, captioner, tmp_path):
    damaged = tmp_path / "damaged.pth"
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["model"]["image.weight"][0, 0] += 1
    torch.save(checkpoint, damaged)
    with pytest.raises(UserError, match="damaged.pth: not a usable retrieval checkpoint: .*checksum"):
        retrieval.load(str(damaged))
    del checkpoint["config"]["joint"], checkpoint["checksum"]
    torch.save(checkpoint, damaged)
    with pytest.raises(UserError, match="damaged.pth: not a usable retrieval checkpoint: its sizes"):
        retrieval.load(str(damaged))
    with pytest.raises(UserError, match="not a retrieval checkpoint: missing kind"):
        retrieval.load(str(captioner / "checkpoints" / "best.pth"))
    with pytest.raises(SystemExit, match="holds a retrieval model .* not a captioner"):
        generate(**options(demo, img=demo.img_path, model_ckpt=trained))


def test_evaluate_reports_caption_to_photo_recall_of_the_model_and_of_people(demo, trained, captioner, tmp_path,
                                                                           capsys):
    metrics = tmp_path / "m.json"
    evaluate(**options(demo, captioner, retrieval_ckpt=trained, metrics_path=str(metrics)))
    out = capsys.readouterr().out
    assert "caption -> photo among 30 photos, these captions: R@1" in out and "people's (first reference)" in out
    scores = json.load(open(metrics))
    assert scores["people_retrieval"]["R@5"] > 5 / 30 and 1 <= scores["retrieval"]["median_rank"] <= 30
    with pytest.raises(SystemExit, match="--retrieval-ckpt: give the scored images' encoded captions"):
        evaluate(**options(demo, captioner, retrieval_ckpt=trained, val_caption_data_path=""))


def test_reranking_changes_the_chosen_caption_only_with_a_weight_and_picks_the_closest_to_the_photo(demo, trained,
                                                                                                     captioner, capsys):
    capsys.readouterr()
    photos = f"{demo.img_path}/val_00[0-2]?.jpg"

    def said(**changes):
        generate(**options(demo, captioner, img=photos, decoding="sample", n_best=6, seed=1, **changes))
        return [line.split("\t") for line in capsys.readouterr().out.splitlines()]  # path, caption, score

    plain = said()
    assert said(retrieval_ckpt=trained) == plain  # a retrieval model alone changes nothing
    reranked = said(retrieval_ckpt=trained, rerank_weight=1000.0)
    assert sorted(reranked) == sorted(plain) and reranked != plain  # the same captions, in another order
    model, first = retrieval.load(trained), {}
    data, features, _, _ = load_split(demo.val_caption_data_path)
    for path, text, _ in reranked:
        first.setdefault(path, text)
    for path, text in first.items():  # each photo's first caption: the best by log-probability + 1000 x cosine
        row = data["id2ix"][path.rsplit("/", 1)[1]]
        texts, scores = zip(*[(t, float(score)) for p, t, score in plain if p == path])
        cosines = model.similarity(list(texts), torch.from_numpy(np.asarray(features[[row]], dtype=np.float32)))[:, 0]
        ranked = [score + 1000 * cosine for score, cosine in zip(scores, cosines.tolist())]
        assert ranked[texts.index(text)] == pytest.approx(max(ranked), abs=0.5)  # (photo features re-extracted)
    with pytest.raises(SystemExit, match="--rerank-weight: name the retrieval model"):
        generate(**options(demo, captioner, img=photos, rerank_weight=1.0))


def test_the_discriminability_reward_prefers_the_batchs_matching_caption(demo, trained):
    data, _, _, rows = load_split(demo.val_caption_data_path)
    model = retrieval.load(trained)
    _, pooled = retrieval.pooled_features(model, demo.val_caption_data_path)
    ix2word, end = data["ix2word"], data["word2ix"]["</EOS>"]
    reward = Discriminability(model, pooled, ix2word, end)
    rows = list(rows)
    # each photo's two samples: its own first reference, then another photo's
    candidates = [" ".join(map(str, data["caption"][row][0] + [end])) for row in rows]
    others = candidates[7:] + candidates[:7]
    keys = [row for row in rows for _ in range(2)]
    scores = reward(keys, [text for pair in zip(candidates, others) for text in pair], 2).reshape(-1, 2)
    assert (scores <= 0).all() and scores.min() >= -(2 + retrieval.MARGIN)
    assert scores[:, 0].mean() > scores[:, 1].mean() + 0.1 and (scores[:, 0] > scores[:, 1]).mean() > 0.7
    alone = reward(keys[:2], candidates[:1] + others[:1], 2)  # one photo: no other photo to lose to
    assert alone.tolist() == [0.0, 0.0]


def test_self_critical_training_with_the_discriminability_reward(demo, trained, tmp_path, capsys):
    run = options(demo, tmp_path, epoch=1, scst_epoch=1, eval_size=0, metric="val_loss", scst_samples=2)
    with pytest.raises(SystemExit, match="--scst-retrieval-weight: name the retrieval model with --retrieval-ckpt"):
        train(**{**run, "scst_retrieval_weight": 1.0})
    assert not (tmp_path / "checkpoints").exists()  # refused before any training
    train(**{**run, "scst_retrieval_weight": 2.0, "retrieval_ckpt": trained})
    out = capsys.readouterr().out
    assert "self-critical phase: 1 epochs" in out and "+ 2.0 x discriminability" in out
    assert "epoch 2: val_loss" in out  # the self-critical epoch ran to its validation
