import math

import pytest
import torch

from beam_search import beam_search
from bench import bench_model, textbook_beam_search
from config import UserError
from model import AttentionModel, CaptionModel, UpDownModel, quantized

PAD, END, UNKNOWN = 0, 1, 2


def small_model(kind):
    """A random pooled, attention or updown model over 9 words, and features for 8 images (4 regions each)."""
    if kind == "pooled":
        return CaptionModel(vocab_size=9, feature_dim=5, embedding_dim=6, hidden_size=8, num_layers=2,
                            dropout=0).eval(), torch.randn(8, 5)
    if kind == "updown":
        return UpDownModel(vocab_size=9, feature_dim=5, embedding_dim=6, hidden_size=8, attention_dim=7,
                           dropout=0).eval(), torch.randn(8, 4, 5)
    return AttentionModel(vocab_size=9, feature_dim=5, embedding_dim=6, hidden_size=8, attention_dim=7,
                          dropout=0, alpha_c=1.0).eval(), torch.randn(8, 4, 5)


@pytest.mark.parametrize("kind", ["pooled", "attention", "updown"])
@pytest.mark.parametrize("seed, beam_size, length_norm", [(0, 1, 0.0), (1, 3, 0.0), (2, 4, 0.7), (3, 2, 1.0),
                                                          (4, 3, 0.0), (5, 5, 0.0)])
@torch.no_grad()
def test_batched_search_matches_per_image_reference(kind, seed, beam_size, length_norm):
    torch.manual_seed(seed)
    model, features = small_model(kind)
    model.classifier.bias[END] += 1.0  # </EOS> likely enough that beams end at different times
    model.classifier.bias[UNKNOWN] += 2.0  # the model's favourite word, which must never come out
    batched = beam_search(model, features, END, [PAD, UNKNOWN], beam_size=beam_size, max_len=8,
                          length_norm=length_norm)
    for i in range(len(features)):
        words, score = textbook_beam_search(model, features[i], END, [PAD, UNKNOWN], beam_size, 8, length_norm)
        assert batched[i][0][0] == words
        assert batched[i][0][1] == pytest.approx(score, abs=1e-4)
        assert UNKNOWN not in words and PAD not in words


@pytest.mark.parametrize("kind", ["pooled", "attention"])
def test_done_images_leave_the_batch_and_captions_stay_those_of_all_steps(kind):
    """The bench models end captions after 3 to 23 words, by image: the search runs one beam per image
    first, then drops the images that are done, and still finds what the plain loop finds in all 31 steps."""
    model, features = bench_model(kind)
    features = features[:6]
    rows = []
    step = model.step
    model.step = lambda inputs, state, banned=None: (rows.append(len(inputs)), step(inputs, state, banned))[1]
    found = beam_search(model, features, END, [PAD, UNKNOWN], beam_size=2, max_len=30)
    del model.step
    assert rows[:2] == [6, 12]  # one beam per image at the first step, then beam_size
    assert rows[1:] == sorted(rows[1:], reverse=True) and len(set(rows[1:])) > 2  # images leave as they finish
    for image, [(words, score, _)] in enumerate(found):
        reference, reference_score = textbook_beam_search(model, features[image], END, [PAD, UNKNOWN], 2, 30)
        assert words == reference and score == pytest.approx(reference_score, abs=1e-3)


@torch.no_grad()
def test_each_word_comes_with_the_region_weights_that_chose_it():
    """Replaying a returned caption word by word gives the same weights the search returned."""
    torch.manual_seed(7)
    model, regions = small_model("attention")
    for image, (words, _, weights) in enumerate(beam[0] for beam in beam_search(model, regions, END, [], 3, 8)):
        assert weights.shape == (len(words), 4)
        inputs, state = model.start(regions[image:image + 1])
        for word, word_weights in zip(words, weights):
            _, state = model.step(inputs, state)
            torch.testing.assert_close(model.attention(state)[0], word_weights)
            inputs = model.embed(torch.tensor([word]))
    pooled_model, features = small_model("pooled")
    assert all(beam[0][2] is None for beam in beam_search(pooled_model, features, END, [], 3, 8))


class MarkovModel:
    """A hand-built decoder: the next word's probabilities depend only on the previous word."""

    def __init__(self, table, vocab_size):
        self.vocab_size = vocab_size
        self.log_probs = torch.full((vocab_size + 1, vocab_size), -math.inf)  # last row: the first step
        self.log_probs[:, END] = 0.0  # a word not in the table ends the caption
        for previous, following in table.items():
            self.log_probs[previous] = -math.inf
            for word, probability in following.items():
                self.log_probs[previous, word] = math.log(probability)

    def start(self, features):
        return torch.full((len(features),), self.vocab_size), ()  # "previous word": the start row

    @staticmethod
    def attention(state):
        return None

    def step(self, inputs, state, banned=None):
        log_probs = self.log_probs[inputs]
        if banned is not None:  # renormalised over the other words, as the real models do
            log_probs = log_probs.index_fill(-1, banned, -math.inf).log_softmax(-1)
        return log_probs, state

    def embed(self, words):
        return words

    @staticmethod
    def select(state, rows):
        return state


A, B, C, D = 3, 4, 5, 6
START = 7


def test_a_finished_caption_is_never_pushed_out_by_live_beams():
    """'A' ends with log-probability -2.0; two live beams score better at that step, then only fall.
    A search that keeps finished captions among the k live beams loses 'A' and ends with a worse one."""
    model = MarkovModel({START: {A: 0.37, B: 0.33, C: 0.3},
                         A: {END: 0.37, C: 0.63},
                         B: {C: 0.5, D: 0.5},
                         C: {C: 0.6, END: 0.05, D: 0.35},
                         D: {D: 0.6, END: 0.05, C: 0.35}}, vocab_size=7)
    [[(words, score, _)]] = beam_search(model, torch.zeros(1, 1), END, [PAD, UNKNOWN], beam_size=2, max_len=6)
    assert words == [A]
    assert score == pytest.approx(math.log(0.37 * 0.37))
    [n_best] = beam_search(model, torch.zeros(1, 1), END, [PAD, UNKNOWN], beam_size=2, max_len=6, n_best=2)
    assert n_best[0][0] == [A] and n_best[1][1] < n_best[0][1]


def test_unknown_is_never_emitted_even_when_most_likely():
    model = MarkovModel({START: {UNKNOWN: 0.9, A: 0.1}, A: {UNKNOWN: 0.9, END: 0.1}, UNKNOWN: {END: 1.0}}, 7)
    [[(words, score, _)]] = beam_search(model, torch.zeros(1, 1), END, [PAD, UNKNOWN], beam_size=2, max_len=4)
    assert words == [A] and score == pytest.approx(0.0)  # renormalised over the allowed words


@torch.no_grad()
def test_n_best_sorted_and_greedy_is_argmax():
    torch.manual_seed(5)
    model = CaptionModel(9, 4, 6, 8, 1, 0).eval()
    features = torch.randn(3, 4)
    n_best = beam_search(model, features, END, [PAD, UNKNOWN], beam_size=4, max_len=6, n_best=4)
    assert all(len(beams) == 4 and [s for _, s, _ in beams] == sorted((s for _, s, _ in beams), reverse=True)
               for beams in n_best)
    greedy = beam_search(model, features, END, [PAD, UNKNOWN], beam_size=1, max_len=6)
    log_probs, _ = model.step(*model.start(features[:1]))
    log_probs[0, [PAD, UNKNOWN, END]] = -math.inf  # a caption has a word before it may end
    assert greedy[0][0][0][:1] == [log_probs.argmax().item()]


def test_rejects_impossible_sizes():
    with pytest.raises(UserError, match="need n-best <= beam size <= the 2 words"):
        beam_search(CaptionModel(5, 4, 6, 8, 1, 0), torch.randn(1, 4), END, [PAD, UNKNOWN], beam_size=3)


@pytest.mark.parametrize("min_len", [1, 3])
def test_no_caption_ends_before_min_len_words_even_when_the_end_is_near_certain(min_len):
    near_end = {END: 0.98, A: 0.012, B: 0.008}
    model = MarkovModel({START: near_end, A: near_end, B: near_end}, 7)
    [beams] = beam_search(model, torch.zeros(1, 1), END, [PAD, UNKNOWN], beam_size=2, max_len=6, n_best=2,
                          min_len=min_len)
    assert [len(words) for words, _, _ in beams] == [min_len, min_len]
    reference, score = textbook_beam_search(model, torch.zeros(1), END, [PAD, UNKNOWN], 2, 6, min_len=min_len)
    assert reference == beams[0][0] and score == pytest.approx(beams[0][1])


def test_no_caption_ends_on_an_unfinished_word_even_when_the_end_is_near_certain():
    """A (一个) is the model's favourite first word and </EOS> near-certain after it: with A unfinished
    the search says more (A then B), and without the rule it says A alone."""
    model = MarkovModel({START: {A: 0.95, C: 0.05}, A: {END: 0.9, B: 0.1}, B: {END: 1.0}, C: {END: 1.0}}, 7)
    [[(ruled, score, _)]] = beam_search(model, torch.zeros(1, 1), END, [PAD, UNKNOWN], beam_size=2, max_len=6,
                                        unfinished=[A])
    assert ruled == [A, B] and score == pytest.approx(math.log(0.95 * 0.1))  # beats C alone (0.05)
    [[(free, _, _)]] = beam_search(model, torch.zeros(1, 1), END, [PAD, UNKNOWN], beam_size=2, max_len=6)
    assert free == [A]


def test_a_caption_of_unfinished_words_only_still_ends_at_max_len():
    model = MarkovModel({START: {A: 1.0}, A: {END: 0.9, A: 0.1}}, 7)
    [[(words, _, _)]] = beam_search(model, torch.zeros(1, 1), END, [PAD, UNKNOWN], beam_size=2, max_len=4,
                                    unfinished=[A])
    assert words == [A] * 4


@pytest.mark.parametrize("kind", ["pooled", "attention", "updown"])
@torch.no_grad()
def test_quantized_model_has_int8_weights_and_nearly_the_same_word_probabilities(kind):
    torch.manual_seed(0)
    model, features = small_model(kind)
    int8 = quantized(model)
    assert isinstance(int8.classifier, torch.ao.nn.quantized.dynamic.Linear)
    inputs, state = model.start(features)
    int8_inputs, int8_state = int8.start(features)
    difference = (model.step(inputs, state)[0].exp() - int8.step(int8_inputs, int8_state)[0].exp()).abs().max()
    assert 0 < difference < 0.02  # really rounded, and only slightly
    assert len(beam_search(int8, features, END, [PAD, UNKNOWN], beam_size=3, max_len=8)) == len(features)
