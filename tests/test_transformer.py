"""The Transformer captioner: its cached one-position-at-a-time decoding gives what running the decoder
over the whole prefix gives, the batched beam search finds what the per-image reference finds, and
it trains through every phase and draws its attention."""
import os

import pytest
import torch
from conftest import options

from beam_search import beam_search
from bench import PrefixRerun, cache, textbook_beam_search
from main import generate, train
from model import TransformerModel, load_checkpoint
from visualize import cjk_font

PAD, END, UNKNOWN = 0, 1, 2


def small_transformer(seed=0):
    torch.manual_seed(seed)
    model = TransformerModel(vocab_size=11, feature_dim=5, d_model=16, heads=4, layers=2, dropout=0.1).eval()
    with torch.no_grad():  # </EOS> at a fixed, fairly low logit: captions of several words, ending at different times
        model.embedding.weight.normal_(0, 1)  # peaked word distributions (the initial near-uniform ones: 1 word)
        model.embedding.weight[END] = 0.0
        model.classifier.bias[END] = 2.0
    return model, torch.randn(3, 4, 5)  # 3 images of 4 regions


def prefix_log_probs(model, regions, prefixes):
    """The reference: the decoder over each whole prefix at once -> log-probabilities of the next word (N, V)."""
    captions = torch.tensor([prefix + [END] for prefix in prefixes])  # the last input is the prefix's last word
    lengths = torch.full((len(prefixes),), captions.size(1))
    logits, _, _ = model(regions, captions, lengths)  # packed time-major: the last len(prefixes) rows are the last step
    return logits[-len(prefixes):].log_softmax(-1)


@torch.no_grad()
def test_cached_steps_with_beam_reorderings_match_the_whole_prefix():
    model, regions = small_transformer()
    beams = 2
    inputs, state = model.start(regions)
    log_probs, state = model.step(inputs, state)
    prefixes = [[] for _ in range(3)]
    torch.testing.assert_close(log_probs, prefix_log_probs(model, regions, prefixes), atol=1e-5, rtol=0)
    generator = torch.Generator().manual_seed(1)
    rows = torch.arange(3).repeat_interleave(beams).view(3, beams)  # first: every image's row, twice
    for _ in range(4):
        words = torch.randint(3, 11, (3 * beams,), generator=generator)
        prefixes = [prefixes[row] + [int(word)] for row, word in zip(rows.reshape(-1).tolist(), words)]
        state = model.select(state, rows)
        log_probs, state = model.step(model.embed(words), state)
        torch.testing.assert_close(log_probs, prefix_log_probs(model, regions.repeat_interleave(beams, 0), prefixes),
                                   atol=1e-5, rtol=0)
        # the next step's beams: each image's rows, shuffled (a beam may be followed twice)
        rows = torch.stack([image * beams + torch.randint(0, beams, (beams,), generator=generator)
                            for image in range(3)])


@pytest.mark.parametrize("seed, beam_size", [(0, 1), (1, 3), (3, 4)])
@torch.no_grad()
def test_batched_search_matches_the_per_image_reference(seed, beam_size):
    model, regions = small_transformer(seed)
    found = beam_search(model, regions, END, [PAD, UNKNOWN], beam_size=beam_size, max_len=8)
    for image in range(len(regions)):
        words, score = textbook_beam_search(model, regions[image], END, [PAD, UNKNOWN], beam_size, 8)
        assert found[image][0][0] == words
        assert found[image][0][1] == pytest.approx(score, abs=1e-4)
    assert max(len(beams[0][0]) for beams in found) >= 6  # long captions: many cached steps and reorderings


@torch.no_grad()
def test_packed_training_loss_is_step_by_step_teacher_forcing():
    model, regions = small_transformer()
    captions = torch.tensor([[3, 4, 5, END], [6, END, PAD, PAD], [7, 8, END, PAD]])
    lengths = torch.tensor([4, 2, 3])
    at_once, targets, _ = model(regions, captions, lengths)
    stepped, stepped_targets, _ = model.unrolled(regions, captions, lengths)
    assert torch.equal(targets, stepped_targets)
    torch.testing.assert_close(at_once, stepped, atol=1e-5, rtol=0)


@pytest.mark.skipif(cjk_font() is None, reason="no CJK font (install.sh installs fonts-wqy-zenhei)")
def test_the_transformer_trains_through_its_phases_and_draws_its_attention(demo, tmp_path, capsys):
    train(**options(demo, tmp_path, model="transformer", d_model=32, heads=4, transformer_layers=1, epoch=2,
                    scst_epoch=1, lr=3e-3, eval_size=8))
    last = load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))
    assert (last["state"]["phase"], last["state"]["epoch"]) == ("self-critical", 3)
    capsys.readouterr()
    generate(**options(demo, tmp_path, img=os.path.join(demo.img_path, "val_0002.jpg"),
                       attention_map=str(tmp_path / "maps")))
    assert capsys.readouterr().out.strip().split("\t")[1]
    assert os.path.getsize(tmp_path / "maps" / "val_0002.attention.png") > 1000


def test_the_bench_baseline_that_reruns_the_prefix_finds_what_the_cache_finds():
    model, regions = small_transformer(seed=3)
    cached = beam_search(model, regions, END, [PAD, UNKNOWN], beam_size=3, max_len=8, n_best=3)
    rerun = beam_search(PrefixRerun(model), regions, END, [PAD, UNKNOWN], beam_size=3, max_len=8, n_best=3)
    for mine, theirs in zip(cached, rerun):
        assert [words for words, _, _ in mine] == [words for words, _, _ in theirs]
        assert [score for _, score, _ in mine] == pytest.approx([score for _, score, _ in theirs], abs=1e-4)
    row = cache(count=4, beam_size=2)
    assert row["same_captions"] == 1.0 and row["cache_images_per_s"] > 0 and row["mean_words"] > 0


def test_a_transformer_too_large_for_the_memory_is_refused_before_it_is_built(demo, tmp_path):
    """--d-model=4096 --heads=64 --transformer-layers=24: 11G weights, 168 GiB to train; no allocator traceback."""
    huge = {"model": "transformer", "d_model": 4096, "heads": 64, "transformer_layers": 24}
    with pytest.raises(SystemExit, match=r"--model=transformer at these sizes has \d+M weights: .* GiB free"):
        train(**options(demo, tmp_path, **huge))
    assert not os.path.exists(tmp_path / "checkpoints" / "last.pth")
