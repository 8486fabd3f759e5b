"""bench.py's parts on tiny inputs: they run and bench the photos they are given."""
import os

import pytest

import bench
from config import UserError


def test_extract_benches_the_photos_of_img_path_and_their_reading(demo, tmp_path):
    row = bench.extract(count=8, rounds=1, work=str(tmp_path), img_path=demo.img_path, batch_size=4, num_workers=0)
    assert row["images"] == 8
    assert not os.listdir(tmp_path)  # no demo set was made in place of the given photos
    assert row["pipeline_images_per_s"] > 0 and row["bare_forward_images_per_s"] > 0
    assert row["reading_share"] == pytest.approx(row["bare_forward_images_per_s"]
                                                 / row["reading_images_per_s_one_core"])


def test_an_img_path_without_images_is_an_error_not_the_demo_set(tmp_path):
    with pytest.raises(UserError, match="no images to bench with"):
        bench.extract(work=str(tmp_path / "work"), img_path=str(tmp_path / "missing"))
    assert not os.path.exists(tmp_path / "work")


def test_the_textbook_search_stopping_early_runs_and_finds_beam_searchs_caption():
    """`bench.py beam` (and `all`) ended in max() of an empty pool: the pool is empty before min_len words."""
    from beam_search import beam_search
    model, features = bench.bench_model("pooled")
    for feature in features[:2]:
        words, score = bench.textbook_beam_search(model, feature, bench.END, (bench.PAD, bench.UNKNOWN), 3,
                                                  bench.MAX_LEN, stop_early=True)
        (found, found_score, _), = beam_search(model, feature[None], bench.END, (bench.PAD, bench.UNKNOWN), 3,
                                               bench.MAX_LEN)[0]
        assert words == found and score == pytest.approx(found_score, abs=1e-4)
