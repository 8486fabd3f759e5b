import pytest
import torch

from beam_search import beam_search
from model import CaptionModel


def reference_search(model, feature, end, beam_size, max_len, length_norm):
    """Plain per-image beam search, one hypothesis at a time, with the same rules."""
    image, state = model.start(feature[None])
    beams = [([], 0.0, False, state)]  # words, score, finished, lstm state
    for t in range(max_len):
        candidates = []
        for words, score, finished, state in beams:
            if finished:
                candidates.append((words, score, True, state))
                continue
            inputs = image if t == 0 else model.embedding(torch.tensor([words[-1]]))
            log_probs, new_state = model.step(inputs, state)
            for word, log_prob in enumerate(log_probs[0].tolist()):
                candidates.append((words + [word], score + log_prob, word == end, new_state))
        beams = sorted(candidates, key=lambda c: c[1], reverse=True)[:beam_size]
        if all(finished for _, _, finished, _ in beams):
            break
    ranked = []
    for words, score, finished, _ in beams:
        length = len(words)
        ranked.append((words[:-1] if finished else words, score / length ** length_norm))
    return max(ranked, key=lambda r: r[1])


@pytest.mark.parametrize("seed, beam_size, length_norm", [(0, 1, 0.0), (1, 3, 0.0), (2, 4, 0.7), (3, 2, 1.0)])
@torch.no_grad()
def test_batched_search_matches_per_image_reference(seed, beam_size, length_norm):
    torch.manual_seed(seed)
    model = CaptionModel(vocab_size=7, feature_dim=5, embedding_dim=6, hidden_size=8, num_layers=2, dropout=0).eval()
    with torch.no_grad():
        model.classifier.bias[1] += 1.0  # </EOS> (index 1) likely enough that beams end at different times
    features = torch.randn(6, 5)
    batched = beam_search(model, features, end=1, beam_size=beam_size, max_len=8, length_norm=length_norm)
    for i in range(len(features)):
        words, score = reference_search(model, features[i], 1, beam_size, 8, length_norm)
        assert batched[i][0][0] == words
        assert batched[i][0][1] == pytest.approx(score, abs=1e-4)


@torch.no_grad()
def test_n_best_sorted_and_greedy_is_argmax():
    torch.manual_seed(5)
    model = CaptionModel(9, 4, 6, 8, 1, 0).eval()
    features = torch.randn(3, 4)
    n_best = beam_search(model, features, end=1, beam_size=4, max_len=6, n_best=4)
    assert all(len(beams) == 4 and [s for _, s in beams] == sorted((s for _, s in beams), reverse=True)
               for beams in n_best)
    greedy = beam_search(model, features, end=1, beam_size=1, max_len=6)
    log_probs, _ = model.step(*model.start(features[:1]))
    assert greedy[0][0][0][:1] == [log_probs.argmax().item()] or greedy[0][0][0] == []


def test_rejects_impossible_sizes():
    with pytest.raises(ValueError):
        beam_search(CaptionModel(3, 4, 6, 8, 1, 0), torch.randn(1, 4), end=1, beam_size=5)
