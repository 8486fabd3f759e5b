"""Ensembles: several checkpoints decode as one by the mean of their word probabilities, any mix of
models, each model on its own features; checkpoints of different vocabularies are refused."""
import json
import os

import pytest
import torch
from conftest import options
from test_hostile_inputs import one_line_error
from test_transformer import END, PAD, UNKNOWN, small_transformer

from beam_search import beam_search
from bench import textbook_beam_search
from main import evaluate, generate, train
from model import AttentionModel, CaptionModel, Ensemble, checksum, load_checkpoint


def three_models():
    """A pooled LSTM (features of 6), an attention LSTM and a transformer (4 regions of 5 each), and
    the ensemble's features: each image's pooled vector and two region sets, flattened side by side."""
    transformer, regions = small_transformer(seed=1)
    torch.manual_seed(2)
    pooled = CaptionModel(11, 6, embedding_dim=8, hidden_size=12, num_layers=2, dropout=0.0).eval()
    attention = AttentionModel(11, 5, embedding_dim=8, hidden_size=12, attention_dim=7, dropout=0.0,
                               alpha_c=1.0).eval()
    vectors, other_regions = torch.randn(3, 6), torch.randn(3, 4, 5)
    members = [(pooled, vectors), (attention, other_regions), (transformer, regions)]
    ensemble = Ensemble([model for model, _ in members], [tuple(features.shape[1:]) for _, features in members])
    return members, ensemble, torch.cat([features.flatten(1) for _, features in members], 1)


@torch.no_grad()
def test_each_step_is_the_mean_of_the_members_probabilities_through_beam_reorderings():
    members, ensemble, features = three_models()
    banned = torch.tensor([PAD, UNKNOWN])
    inputs, state = ensemble.start(features)
    alone = [model.start(own) for model, own in members]
    reorderings = [[[0, 0], [1, 1], [2, 2]]] + [[[1, 0], [3, 3], [4, 5]]] * 3  # two beams per image after the first
    for rows, words in zip(map(torch.tensor, reorderings), [[3, 4, 5, 6, 7, 8], [9, 3, 4, 5, 5, 6], [7, 8, 3, 4, 9, 9],
                                                           [3, 3, 3, 3, 3, 3]]):
        log_probs, state = ensemble.step(inputs, state, banned)
        stepped = [model.step(own_inputs, own_state, banned) for (model, _), (own_inputs, own_state) in
                   zip(members, alone)]
        mean = torch.stack([own.exp() for own, _ in stepped]).mean(0)
        torch.testing.assert_close(log_probs.exp(), mean, atol=1e-6, rtol=0)
        assert (log_probs[:, [PAD, UNKNOWN]] == float("-inf")).all()
        torch.testing.assert_close(ensemble.attention(state), members[1][0].attention(stepped[1][1]))
        words = torch.tensor(words)
        state = ensemble.select(state, rows)
        alone = [(model.embed(words), model.select(own_state, rows)) for (model, _), (_, own_state) in
                 zip(members, stepped)]
        inputs = ensemble.embed(words)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_the_batched_search_of_an_ensemble_matches_the_per_image_reference(beam_size):
    _, ensemble, features = three_models()
    found = beam_search(ensemble, features, END, [PAD, UNKNOWN], beam_size=beam_size, max_len=8)
    for image in range(len(features)):
        words, score = textbook_beam_search(ensemble, features[image], END, [PAD, UNKNOWN], beam_size, 8)
        assert found[image][0][0] == words
        assert found[image][0][1] == pytest.approx(score, abs=1e-4)


def test_an_ensemble_of_a_model_with_itself_finds_what_the_model_finds():
    model, regions = small_transformer(seed=3)
    twice = Ensemble([model, model], [(4, 5), (4, 5)])
    alone = beam_search(model, regions, END, [PAD, UNKNOWN], beam_size=3, max_len=8, n_best=2)
    together = beam_search(twice, torch.cat([regions.flatten(1)] * 2, 1), END, [PAD, UNKNOWN], beam_size=3,
                           max_len=8, n_best=2)
    for mine, theirs in zip(alone, together):
        assert [words for words, _, _ in mine] == [words for words, _, _ in theirs]
        assert [score for _, score, _ in mine] == pytest.approx([score for _, score, _ in theirs], abs=1e-5)


@pytest.fixture(scope="module")
def two_checkpoints(demo, tmp_path_factory):
    """A pooled LSTM and a transformer trained on the demo set: two models of different features."""
    folder = tmp_path_factory.mktemp("ensemble")
    train(**options(demo, folder / "pooled", epoch=2, eval_size=0, metric="val_loss", lr=3e-3))
    train(**options(demo, folder / "transformer", model="transformer", d_model=32, heads=4, transformer_layers=1,
                    epoch=2, eval_size=0, metric="val_loss", lr=3e-3))
    return [str(folder / kind / "checkpoints" / "best.pth") for kind in ("pooled", "transformer")]


def test_generate_and_evaluate_with_a_pooled_and_a_transformer_checkpoint(demo, two_checkpoints, tmp_path, capsys):
    capsys.readouterr()
    generate(**options(demo, img=os.path.join(demo.img_path, "val_000*.jpg"), model_ckpt=",".join(two_checkpoints)))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 10 and all(line.split("\t")[1] for line in lines)
    evaluate(**options(demo, model_ckpt=",".join(two_checkpoints), metrics_path=str(tmp_path / "scores.json")))
    scores = json.load(open(tmp_path / "scores.json"))
    assert scores["images"] == 30 and scores["empty_captions"] == 0 and scores["BLEU-1"] > 0


def test_checkpoints_of_different_vocabularies_are_refused_in_one_line(demo, two_checkpoints, tmp_path):
    checkpoint = load_checkpoint(two_checkpoints[1])
    ix2word = list(checkpoint["ix2word"])
    ix2word[-1], ix2word[-2] = ix2word[-2], ix2word[-1]  # the same words, two of them at each other's index
    other = str(tmp_path / "other.pth")
    changed = {**checkpoint, "ix2word": ix2word}
    torch.save({**changed, "checksum": checksum(changed)}, other)  # saved so, not damaged
    with pytest.raises(SystemExit) as error:
        generate(**options(demo, img=os.path.join(demo.img_path, "val_0001.jpg"),
                           model_ckpt=f"{two_checkpoints[0]},{other}"))
    one_line_error(error, other, two_checkpoints[0], "vocabularies differ")


@pytest.mark.parametrize("names", ["{0},", "{0},,{0}", "{0},{1}/missing.pth"])
def test_an_ensemble_with_an_empty_or_missing_checkpoint_name_is_one_line(demo, two_checkpoints, tmp_path, names):
    with pytest.raises(SystemExit) as error:
        generate(**options(demo, img=os.path.join(demo.img_path, "val_0001.jpg"),
                           model_ckpt=names.format(two_checkpoints[0], tmp_path)))
    one_line_error(error, "missing.pth" if "missing" in names else "empty checkpoint name")
