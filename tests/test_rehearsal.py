"""The AI-Challenger-size rehearsal's own parts: recombined captions, features the pipeline accepts, the
read and statistics steps, and sizes."""

import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import images
import rehearsal
from config import UserError
from data_preprocess import process
from dataset import load_split

SENTENCES = ["一个男人在骑自行车", "两只狗在草地上奔跑", "一个女孩坐在长椅上", "海边有三个孩子"]


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10 ** 6))
def test_a_recombined_sentence_starts_as_one_real_sentence_and_ends_as_another(seed):
    for made in rehearsal.recombined_sentences(SENTENCES, 20, seed):
        assert made in SENTENCES or any(  # a start of one joined at a shared character to the end of another
            made == first[:i] + second[j:] and first[i] == second[j]
            for first in SENTENCES for second in SENTENCES for i in range(1, len(first)) for j in range(1, len(second)))


@pytest.fixture(scope="module", params=["float16", "int8"])
def rehearsed(tmp_path_factory, request):
    """A 40-photo rehearsal folder: captions encoded, features written (float16 or int8)."""
    folder = tmp_path_factory.mktemp("rehearsal")
    rehearsal.write_captions(str(folder / "captions.json"), 40, SENTENCES)
    process(annotation_file=str(folder / "captions.json"), caption_data_path=str(folder / "train.pth"), min_appear=1)
    rehearsal.write_features(str(folder / "train.pth"), [f"{i:06d}.jpg" for i in range(40)], feature_dim=8,
                             dtype=request.param)
    return folder


def test_the_features_it_writes_are_what_the_pipeline_reads(rehearsed):
    data, features, meta, rows = load_split(str(rehearsed / "train.pth"), grid=True)
    assert features.shape == (40, 49, 8) and len(rows) == 40
    assert len(data["caption"][0]) == rehearsal.CAPTIONS_PER_IMAGE and meta["weights"] == "rehearsal"
    stored = np.load(images.features_path(str(rehearsed / "train.pth"), grid=True))
    assert stored.dtype == np.dtype(meta["dtype"])
    values = features[np.arange(40)]  # random in [0, 1): int8 within half a scale of them, 1/254 at most
    assert values.min() >= -0.01 and values.max() <= 1.01 and values.std() > 0.2


def test_the_read_and_statistics_steps_measure(rehearsed):
    options = {"images": 40, "batches": 3, "val_images": 4}
    reads = rehearsal.step_reads(str(rehearsed), options)
    assert min(reads[f"{name}_batches_per_s"] for name in ("memory_map", "row_reads", "block_reads")) > 0
    statistics = rehearsal.step_statistics(str(rehearsed), options)
    assert statistics["captions"] == 36 * rehearsal.CAPTIONS_PER_IMAGE and (rehearsed / "train.cider.pth").is_file()


def test_sizes():
    assert rehearsal.parse_size("8G") == 8 * 2 ** 30 and rehearsal.parse_size("512m") == 512 * 2 ** 20
    assert rehearsal.parse_size("1000") == 1000
    with pytest.raises(UserError, match="--memory-limit=lots: give a size such as 8G"):
        rehearsal.parse_size("lots")


@pytest.mark.parametrize("changes, message", [
    ({"images_count": 0}, "--images=0, --val-images=1000: give whole numbers"),
    ({"images_count": 500}, "0 < --val-images < --images"),
    ({"images_count": "many"}, "--images=many"),
    ({"batches": 0}, "--batches=0: give a whole number"),
    ({"memory_limit": "lots"}, "--memory-limit=lots"),
    ({"dtype": "int4"}, "--dtype=int4: give one of float16, int8"),
])
def test_bad_rehearsal_options_are_one_line_before_any_work(tmp_path, changes, message):
    arguments = {"images_count": 2000, "work": str(tmp_path / "scale"), **changes}
    with pytest.raises(UserError, match=message):
        rehearsal.rehearse(**arguments)
    assert not (tmp_path / "scale").exists()


def test_a_step_killed_by_a_signal_is_recorded_and_the_rehearsal_goes_on(monkeypatch):
    """The out-of-memory killer ends a step with SIGKILL: a result saying so, not a crash of the whole run."""
    monkeypatch.setattr(rehearsal.subprocess, "run", lambda *args, **kwargs: types.SimpleNamespace(
        returncode=-9, stdout="", stderr=""))
    assert rehearsal.run_step("self-critical", "work") == {"killed": "signal 9"}


def test_the_evaluate_step_scores_the_photos_it_is_asked_for_and_finds_copies(rehearsed):
    evaluated = rehearsal.step_evaluate(str(rehearsed), {"images": 40, "batches": 3, "val_images": 10})
    assert evaluated["images"] == 10 and evaluated["score_seconds"] > 0
    assert evaluated["copied_from_training"] == 1.0  # a first caption is itself a training caption
