"""Every decoding method (--decoding=beam, greedy, sample, diverse) against a per-image reference and
against each other, under the same rules (banned words, --min-len, --max-gen-len, the ending rule,
--no-repeat); seeded sampling; the options' checks; generate and evaluate with them."""
import dataclasses
import math
import os
import re

import fire
import pytest
import torch
from conftest import options
from test_beam_search import END, PAD, UNKNOWN, A, B, C, MarkovModel, small_model
from test_ensemble import three_models

import config
from beam_search import beam_search, caption_features
from bench import _count_words
from captions import Habits, repeated_words
from config import Config, UserError
from decoding import Rules, cut, draw, greedy, image_generators, sample
from main import evaluate, generate, train

BANNED = [PAD, UNKNOWN]
IX2WORD = ["</PAD>", "</EOS>", "</UNKNOWN>", "a", "b", "c", "d"]  # the MarkovModel's 7 words
NINE_WORDS = IX2WORD + ["e", "f"]  # small_model's
METHODS = ("beam", "greedy", "sample", "diverse")
MAX_LEN = 10


def ending_model(kind, seed):
    """A small random model (peaked word distributions) that ends its captions as a trained one does:
    </EOS> becomes the likeliest word after 1 to 9 words, by image (bench.py's word counter)."""
    torch.manual_seed(seed)
    model, features = small_model(kind)
    with torch.no_grad():
        model.classifier.weight.mul_(3.0)
        _count_words(model, kind)
    return model, features


def words_of(found):
    """Per image [(words, score, attention)] -> per image [words]."""
    return [[words for words, _, _ in captions] for captions in found]


def texts(found):
    """caption_features' answer -> per image [(caption, score)]."""
    return [[(text, score) for text, score, _ in image] for image in found]


def said(found):
    """caption_features' answer -> per image [caption]."""
    return [[text for text, _, _ in image] for image in found]


def search(model, features, **options):
    """beam_search with the rules of these tests."""
    return beam_search(model, features, END, BANNED, **{"max_len": MAX_LEN, **options})


def rules(model, **changes):
    return Rules(model.vocab_size, END, BANNED, **{"max_len": MAX_LEN, **changes})


def textbook_sample(model, feature, rules, generator, samples, temperature=1.0, top_k=0, top_p=1.0):
    """The reference for one image: each sample decoded on its own, word by word, with `samples`
    uniforms drawn per step while any sample goes on -> [(words, log-probability)], best first."""
    start = model.start(feature[None])
    rows = [([], 0.0, *start) for _ in range(samples)]  # words, score, next input, state
    done = [None] * samples
    for t in range(rules.max_len + 1):
        uniforms = torch.rand(samples, generator=generator)
        for s, (words, score, inputs, state) in enumerate(rows):
            if done[s] is not None:
                continue
            log_probs, state = rules.step(model, inputs, state, t, torch.tensor(words[-1:]) if words else None)
            word = draw(cut(log_probs, temperature, top_k, top_p), uniforms[s:s + 1]).item()
            word = END if t == rules.max_len else word
            score += log_probs[0, word].item()
            if word == END:
                done[s] = (words, score)
            rows[s] = (words + [word], score, model.embed(torch.tensor([word])), state)
        if all(done):
            break
    return sorted(done, key=lambda row: row[1], reverse=True)


def textbook_diverse(model, feature, groups, width, diversity, max_len, n_best):
    """The reference for one image: diverse beam search as Vijayakumar et al. describe it, a Python
    list of beams per group, all max_len steps -> [(words, score)]: the best of each group first."""
    root = ([], 0.0, *model.start(feature[None]))
    live, pools = [[root] for _ in range(groups)], [[] for _ in range(groups)]
    for t in range(max_len + 1):
        chosen = {}  # word -> times earlier groups chose it at this step
        for group in range(groups):
            candidates = []
            for words, score, inputs, state in live[group]:
                banned = torch.tensor(BANNED + ([END] if t == 0 else []))
                log_probs, new_state = model.step(inputs, state, banned)
                log_probs = log_probs[0].tolist()
                if t:
                    pools[group].append((words, score + log_probs[END]))
                candidates += [(score + p - diversity * chosen.get(w, 0), words + [w], score + p, new_state)
                               for w, p in enumerate(log_probs) if w != END and p > -math.inf]
            best = sorted(candidates, key=lambda c: c[0], reverse=True)[:width]
            for _, words, _, _ in best:
                chosen[words[-1]] = chosen.get(words[-1], 0) + 1
            live[group] = [(words, score, model.embed(torch.tensor(words[-1:])), state)
                           for _, words, score, state in best]
    ranked = sorted((rank, -score, words) for pool in pools
                    for rank, (words, score) in enumerate(sorted(pool, key=lambda p: p[1], reverse=True)))
    found = {}
    for _, score, words in ranked:
        found.setdefault(tuple(words), (words, -score))
    return list(found.values())[:n_best]


@pytest.mark.parametrize("kind", ["pooled", "attention"])
@pytest.mark.parametrize("seed", range(4))
def test_greedy_follows_beam_1_and_is_it_where_the_model_ends_its_captions(kind, seed):
    """Beam 1 walks greedy's words and returns the likeliest of the captions ended on the way: greedy's
    own, or a shorter one that ended likelier (seen below with a hand-built model)."""
    model, features = ending_model(kind, seed)
    found = greedy(model, features, rules(model))
    beam_1 = search(model, features, beam_size=1)
    for [(words, score, _)], [(beam_words, beam_score, _)] in zip(found, beam_1):
        assert beam_words == words[:len(beam_words)] and beam_score >= score - 1e-5
    assert words_of(found) == words_of(beam_1)  # this model ends its captions where greedy ends them


def test_beam_1_keeps_an_earlier_likelier_ending_that_greedy_passes():
    model = MarkovModel({7: {A: 1.0}, A: {END: 0.4, B: 0.6}, B: {END: 0.55, C: 0.45}, C: {END: 1.0}}, 7)
    [[(words, score, _)]] = greedy(model, torch.zeros(1, 1), rules(model))
    assert words == [A, B] and score == pytest.approx(math.log(0.6 * 0.55))
    [[(beam_words, beam_score, _)]] = search(model, torch.zeros(1, 1), beam_size=1)
    assert beam_words == [A] and beam_score == pytest.approx(math.log(0.4))


@pytest.mark.parametrize("kind", ["pooled", "attention"])
@pytest.mark.parametrize("cuts", [{"top_k": 1}, {"temperature": 1e-4}, {"temperature": 1e-30, "top_p": 0.5}])
def test_sampling_with_one_word_left_is_greedy(kind, cuts):
    model, features = ending_model(kind, 1)
    found = sample(model, features, rules(model), image_generators(features, 0), samples=3, **cuts)
    expected = greedy(model, features, rules(model))
    for samples, [(words, score, _)] in zip(found, expected):
        assert [w for w, _, _ in samples] == [words] * 3
        assert [s for _, s, _ in samples] == pytest.approx([score] * 3, abs=1e-5)


@pytest.mark.parametrize("kind", ["pooled", "attention"])
@pytest.mark.parametrize("beam_size, n_best, length_norm", [(1, 1, 0.0), (3, 3, 0.0), (4, 2, 0.7)])
def test_diverse_beam_search_of_one_group_is_beam_search(kind, beam_size, n_best, length_norm):
    model, features = ending_model(kind, 2)
    opt = Config(beam_size=beam_size, n_best=n_best, length_norm=length_norm, max_gen_len=MAX_LEN, batch_size=3)
    beam = texts(caption_features(model, features, NINE_WORDS, opt))
    diverse = caption_features(model, features, NINE_WORDS,
                               dataclasses.replace(opt, decoding="diverse", diversity_groups=1, diversity_lambda=5.0))
    assert texts(diverse) == beam


@pytest.mark.parametrize("kind", ["pooled", "attention"])
def test_groups_without_a_penalty_each_search_as_a_beam_of_their_width(kind):
    model, features = ending_model(kind, 3)
    groups = search(model, features, beam_size=6, n_best=2, groups=3, diversity=0.0)
    assert words_of(groups) == words_of(search(model, features, beam_size=2, n_best=2))


@pytest.mark.parametrize("kind", ["pooled", "attention"])
@pytest.mark.parametrize("seed, beam_size, groups, diversity", [(0, 3, 3, 0.5), (1, 4, 2, 1.0), (2, 6, 3, 0.3),
                                                                (3, 2, 2, 10.0)])
def test_batched_diverse_search_matches_per_image_reference(kind, seed, beam_size, groups, diversity):
    model, features = ending_model(kind, seed)
    found = search(model, features, beam_size=beam_size, max_len=6, n_best=beam_size,
                        groups=groups, diversity=diversity)
    for image, captions in enumerate(found):
        reference = textbook_diverse(model, features[image], groups, beam_size // groups, diversity, 6, beam_size)
        assert [words for words, _, _ in captions] == [words for words, _ in reference]
        assert [score for _, score, _ in captions] == pytest.approx([score for _, score in reference], abs=1e-4)


@pytest.mark.parametrize("kind", ["pooled", "attention"])
@pytest.mark.parametrize("seed, samples, cuts", [(0, 1, {}), (1, 4, {"temperature": 0.7, "top_p": 0.9}),
                                                 (2, 3, {"top_k": 3}), (3, 5, {"temperature": 1.5, "top_k": 4,
                                                                               "top_p": 0.8})])
def test_batched_sampling_matches_per_image_reference(kind, seed, samples, cuts):
    model, features = ending_model(kind, seed)
    ruled = rules(model, repeatable=() if seed % 2 else None, min_len=2)
    found = sample(model, features, ruled, image_generators(features, seed), samples, **cuts)
    for image, generator in enumerate(image_generators(features, seed)):
        reference = textbook_sample(model, features[image], ruled, generator, samples, **cuts)
        assert [words for words, _, _ in found[image]] == [words for words, _ in reference]
        assert [score for _, score, _ in found[image]] == pytest.approx([score for _, score in reference], abs=1e-4)


@pytest.mark.parametrize("decoding", METHODS)
def test_an_ensemble_and_the_transformer_decode_by_every_method(decoding):
    """Three models of different features as one, through the decoding interface: batched or one image
    at a time (batch size 1), the same captions."""
    members, ensemble, features = three_models()
    opt = Config(decoding=decoding, n_best=2, beam_size=2, max_gen_len=MAX_LEN, top_p=0.9, no_repeat=True)
    words = IX2WORD + ["e", "f", "g", "h"]
    for model, own in [*members[2:], (ensemble, features)]:
        batched = said(caption_features(model, own, words, opt))
        assert said(caption_features(model, own, words, dataclasses.replace(opt, batch_size=1))) == batched
        assert all(len(image) == (1 if decoding == "greedy" else 2) for image in batched)


def test_the_same_seed_draws_the_same_samples_and_another_seed_others():
    model, features = ending_model("attention", 4)
    opt = Config(decoding="sample", n_best=4, max_gen_len=MAX_LEN, seed=7)
    first = texts(caption_features(model, features, NINE_WORDS, opt))
    torch.manual_seed(123)  # the global generator plays no part
    assert texts(caption_features(model, features, NINE_WORDS, opt)) == first
    assert texts(caption_features(model, features, NINE_WORDS, dataclasses.replace(opt, seed=8))) != first


@pytest.mark.parametrize("kind", ["pooled", "attention"])
def test_diverse_groups_and_samples_give_different_captions(kind):
    """A large lambda makes each group start with a word no earlier group chose: the n-best (each
    group's best) start with three different words, where beam search's often share one."""
    model, features = ending_model(kind, 5)
    diverse = search(model, features, beam_size=3, n_best=3, groups=3, diversity=100.0)
    assert all(len({words[0] for words, _, _ in image}) == 3 for image in diverse)
    for image in search(model, features, beam_size=6, n_best=3, groups=3,
                             diversity=0.5):
        assert len(image) == 3 and len({tuple(words) for words, _, _ in image}) == 3
    samples = sample(model, features, rules(model), image_generators(features, 0), samples=5)
    assert sum(len({tuple(words) for words, _, _ in image}) for image in samples) / len(samples) > 2


def replays(model, features, image, words, weights):
    """Whether stepping the model through `words` gives the region weights the decoder returned."""
    inputs, state = model.start(features[image:image + 1])
    for word, word_weights in zip(words, weights):
        _, state = model.step(inputs, state)
        if not torch.allclose(model.attention(state)[0], word_weights, atol=1e-6):
            return False
        inputs = model.embed(torch.tensor([word]))
    return True


@pytest.mark.parametrize("decoding", METHODS)
def test_each_word_comes_with_the_region_weights_that_chose_it(decoding):
    model, regions = ending_model("attention", 6)
    opt = Config(decoding=decoding, n_best=1 if decoding == "greedy" else 3, max_gen_len=MAX_LEN)
    for image, captions in enumerate(caption_features(model, regions, NINE_WORDS, opt)):
        for text, _, weighted in captions:
            assert "".join(word for word, _ in weighted) == text
            words = [NINE_WORDS.index(word) for word, _ in weighted]
            assert replays(model, regions, image, words, [w for _, w in weighted])
    pooled, features = ending_model("pooled", 6)
    assert all(c[2] is None for image in caption_features(pooled, features, NINE_WORDS, opt) for c in image)


def markov_captions(model, decoding, unfinished=(), repeatable=None, **changes):
    """Every caption of the method on 4 copies of the model's one image: [words] per caption."""
    opt = Config(decoding=decoding, n_best=1 if decoding == "greedy" else 2, beam_size=2, max_gen_len=6,
                 **changes)
    found = caption_features(model, torch.zeros(4, 1), IX2WORD, opt, habits=Habits(tuple(unfinished), repeatable))
    return [[IX2WORD.index(word) for word in text] if text else [] for image in found for text, _, _ in image]


@pytest.mark.parametrize("decoding", METHODS)
def test_no_repeat_never_says_a_word_twice_in_a_row_even_when_the_model_insists(decoding):
    model = MarkovModel({7: {A: 0.9, B: 0.1}, A: {A: 0.97, B: 0.01, END: 0.02}, B: {B: 0.97, A: 0.01, END: 0.02}}, 7)
    repeats = [any(a == b for a, b in zip(words, words[1:])) for words in markov_captions(model, decoding, min_len=3)]
    assert all(repeats)  # without the rule
    for words in markov_captions(model, decoding, min_len=3, no_repeat=True):
        assert words and all(a != b for a, b in zip(words, words[1:])), words


@pytest.mark.parametrize("decoding", METHODS)
def test_every_method_keeps_the_rules(decoding):
    """</UNKNOWN> the favourite word, never said; no caption shorter than --min-len, longer than
    --max-gen-len or ending on an unfinished word (A, with </EOS> near-certain after it)."""
    model = MarkovModel({7: {UNKNOWN: 0.5, A: 0.45, C: 0.05}, A: {END: 0.9, B: 0.05, UNKNOWN: 0.05},
                         B: {END: 0.5, A: 0.5}, C: {END: 0.99, C: 0.01}, UNKNOWN: {END: 1.0}}, 7)
    free = markov_captions(model, decoding, ending_rule=False)
    assert [A] in free  # what the model says without the rule
    for min_len in (1, 3):
        for words in markov_captions(model, decoding, unfinished=[A], min_len=min_len):
            assert words[-1] != A and UNKNOWN not in words and PAD not in words and min_len <= len(words) <= 6, words
    ever_unfinished = MarkovModel({7: {A: 1.0}, A: {END: 0.9, A: 0.1}}, 7)
    assert markov_captions(ever_unfinished, decoding, unfinished=[A])[0] == [A] * 6  # ends at --max-gen-len


@pytest.mark.parametrize("changes, message", [
    ({"decoding": "greedy", "n_best": 2}, "--n-best=2: greedy decoding gives one caption per image"),
    ({"decoding": "diverse", "n_best": 4}, "--n-best=4 is more than --beam-size=3"),
    ({"decoding": "diverse", "diversity_groups": 2}, "--diversity-groups=2 does not divide --beam-size=3"),
    ({"top_p": 0}, r"--top-p=0.0: must be in \(0, 1\]"), ({"top_p": 1.5}, r"--top-p=1.5: must be in \(0, 1\]"),
    ({"temperature": 0}, "--temperature=0.0: must be > 0"), ({"top_k": -1}, "--top-k=-1: must be >= 0"),
    ({"decoding": "nucleus"}, "--decoding=nucleus: choose one of beam, greedy, sample, diverse"),
])
def test_impossible_decoding_options_are_refused_in_one_line(changes, message):
    with pytest.raises(UserError, match=message):
        config.parse(**changes)


def test_possible_decoding_options_pass():
    config.parse(decoding="sample", n_best=10, temperature=0.7, top_p=0.9, top_k=40, no_repeat=True)
    config.parse(decoding="diverse", beam_size=6, n_best=6, diversity_groups=3, diversity_lambda=0.0)
    config.parse(decoding="diverse", beam_size=5, diversity_groups=0)  # one group per beam
    for command in ("generate", "evaluate", "train"):
        assert {"decoding", "n_best", "top_p", "no_repeat", "diversity_groups"} <= set(
            config.COMMAND_OPTIONS[command].split())


@pytest.fixture(scope="module")
def attention_checkpoint(demo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoding")
    train(**options(demo, folder, model="attention", epoch=1, eval_size=0, metric="val_loss"))
    return str(folder / "checkpoints" / "best.pth")


def test_generate_prints_the_same_samples_for_the_same_seed(demo, attention_checkpoint, tmp_path, capsys):
    photos = os.path.join(demo.img_path, "val_000[0-4].jpg")
    said = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed * 11)  # the global generator plays no part
        generate(**options(demo, img=photos, model_ckpt=attention_checkpoint, decoding="sample", n_best=3,
                           temperature=1.5, seed=seed, attention_map=str(tmp_path / f"maps{len(said)}")))
        said.append(capsys.readouterr().out)
    assert said[0] == said[1] != said[2]
    assert len(said[0].splitlines()) == 15 and len(os.listdir(tmp_path / "maps0")) == 5


def test_evaluate_counts_the_different_captions_of_each_photo(demo, attention_checkpoint, capsys):
    evaluate(**options(demo, model_ckpt=attention_checkpoint, decoding="diverse", beam_size=4, n_best=4,
                       diversity_groups=2))
    summary = re.search(r"--decoding=diverse: ([\d.]+) different captions per photo among its 4.00 \(the first "
                        r"is scored\); ([\d.]+) images/s in all, ([\d.]+) decoding alone", capsys.readouterr().out)
    distinct, speed, decoding_speed = map(float, summary.groups())
    assert 1 < distinct <= 4 and 0 < speed <= decoding_speed


# --- issue 39: decoding options at float32's edges, options the method does not read, weak models ----------
def test_a_temperature_beyond_float32_samples_greedily_or_uniformly_never_nan():
    log_probs = torch.tensor([[-0.5, -1.5, -3.0, -math.inf]])
    for tiny in (1e-9, 1e-50, 5e-324):
        assert cut(log_probs, temperature=tiny).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    for huge in (1e39, 1e300):
        assert cut(log_probs, temperature=huge)[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])  # -inf: out


def test_a_top_p_below_float32_keeps_the_likeliest_word():
    log_probs = torch.tensor([[-2.0, -0.5, -1.5]])
    for small in (1e-9, 1e-300, 5e-324):
        assert (cut(log_probs, top_p=small) > 0).tolist() == [[False, True, False]]


@pytest.mark.parametrize("kind", ["pooled", "attention"])
def test_samples_at_a_tiny_temperature_are_the_greedy_caption_even_beyond_float32(kind):
    model, features = ending_model(kind, 9)
    greedy_opt = Config(decoding="greedy", max_gen_len=MAX_LEN)
    expected = [image[0][0] for image in caption_features(model, features, NINE_WORDS, greedy_opt)]
    for temperature in (1e-9, 1e-50, 5e-324):
        opt = Config(decoding="sample", n_best=3, seed=3, temperature=temperature, max_gen_len=MAX_LEN)
        assert [{text for text, _, _ in image} for image in caption_features(model, features, NINE_WORDS, opt)] == [
            {text} for text in expected]


def test_a_diversity_lambda_beyond_float32_gives_the_captions_of_any_large_lambda():
    model, features = ending_model("attention", 5)
    def said(diversity):
        return [[words for words, _, _ in image] for image in search(model, features, beam_size=3, n_best=3, groups=3,
                                                                     diversity=diversity)]

    assert said(1e39) == said(1e300) == said(1e6)


@pytest.mark.parametrize("decoding, flag, reader", [
    ("beam", "--top-p=0.5", "--decoding=sample"), ("beam", "--temperature=2", "--decoding=sample"),
    ("beam", "--top-k=5", "--decoding=sample"), ("beam", "--diversity-lambda=2", "--decoding=diverse"),
    ("greedy", "--temperature=0.5", "--decoding=sample"), ("greedy", "--top-k=3", "--decoding=sample"),
    ("greedy", "--diversity-groups=3", "--decoding=diverse"), ("diverse", "--top-p=0.9", "--decoding=sample"),
    ("sample", "--diversity-groups=2", "--decoding=diverse"), ("sample", "--beam-size=5", "--decoding=beam"),
])
def test_an_option_the_chosen_decoding_does_not_read_is_refused_naming_its_reader(decoding, flag, reader):
    seen = []
    with pytest.raises(SystemExit, match=f"error: {flag.split('=')[0]} is read by {reader}"):
        fire.Fire({"generate": config.command(lambda opt: seen.append(opt))},
                  command=["generate", f"--decoding={decoding}", flag])
    assert not seen

    def train(opt):
        seen.append(opt)

    fire.Fire({"train": config.command(train)}, command=["train", "--decoding=sample", "--beam-size=5"])
    assert seen[0].beam_size == 5  # train's validation searches with it


@pytest.mark.parametrize("decoding", METHODS)
def test_a_word_the_training_captions_never_say_twice_in_a_row_is_never_repeated(decoding):
    """A weak model's favourite: A again and again (的的的). The training captions never repeat A, so
    the rule (on by default, from the data) refuses it; a word they do repeat (B, 哈哈) may follow itself."""
    model = MarkovModel({7: {A: 0.9, B: 0.1}, A: {A: 0.97, B: 0.01, END: 0.02}, B: {B: 0.97, A: 0.01, END: 0.02}}, 7)
    for words in markov_captions(model, decoding, min_len=3, repeatable=(B,)):
        assert words and all(a != b or a == B for a, b in zip(words, words[1:])), words
    assert any(a == b == A for words in markov_captions(model, decoding, min_len=3) for a, b in zip(words, words[1:]))
    assert any(a == b == A for words in markov_captions(model, decoding, min_len=3, repeatable=(B,),
                                                        ending_rule=False) for a, b in zip(words, words[1:]))


@pytest.mark.parametrize("decoding", METHODS)
def test_a_caption_that_cannot_end_well_is_cut_back_to_its_finished_prefix(decoding):
    """B (a finished word) then unfinished words (A, C) to the end: the run that reached --max-gen-len
    comes back as B, not as BACACA."""
    model = MarkovModel({7: {B: 1.0}, B: {A: 0.9, END: 0.1}, A: {C: 0.9, END: 0.1}, C: {A: 0.9, END: 0.1}}, 7)
    said = markov_captions(model, decoding, unfinished=[A, C], repeatable=())
    assert [B] in said and not any(len(words) == 6 for words in said), said


def test_repeated_words_are_those_a_training_caption_says_twice_in_a_row():
    assert repeated_words([[[3, 4, 4, 5]], [[5, 3], [6, 6, 6]]]) == [4, 6]
    assert repeated_words([[[3, 4, 3]]]) == []
