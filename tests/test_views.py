"""Augmented views of the training photos: what each view is, their extraction, and training that reads
view e % N in epoch e."""
import glob
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import mobilenet_weights, options
from PIL import Image

from captions import load_caption_data
from feature_extract import extract
from images import features_path, load_features, photo_view
from main import train
from trainer import Trainer


def halves():
    """A 100 x 50 photo: red left half, blue right half."""
    pixels = np.zeros((50, 100, 3), np.uint8)
    pixels[:, :50, 0], pixels[:, 50:, 2] = 255, 255
    return Image.fromarray(pixels)


def test_each_view_mirrors_zooms_or_both_and_never_mirrors_a_photo_whose_captions_say_left_or_right():
    photo = halves()
    assert photo_view(photo, 0) is photo
    mirrored = np.asarray(photo_view(photo, 1, ["一只狗在草地上"]))
    assert tuple(mirrored[0, 0]) == (0, 0, 255) and tuple(mirrored[0, -1]) == (255, 0, 0)
    assert np.array_equal(np.asarray(photo_view(photo, 1, ["狗在左边", "一只狗"])), np.asarray(photo))
    zoomed = photo_view(photo, 2)
    assert zoomed.size == (80, 40) and tuple(np.asarray(zoomed)[0, 0]) == (255, 0, 0)
    both = np.asarray(photo_view(photo, 3))
    assert both.shape == (40, 80, 3) and tuple(both[0, 0]) == (0, 0, 255)
    assert np.array_equal(np.asarray(photo_view(photo, 3, ["右边的人"])), np.asarray(zoomed))


@pytest.fixture
def own_demo(demo, tmp_path):
    """The demo's training captions and view-0 features in a folder of the test's own."""
    for path in glob.glob(os.path.splitext(demo.caption_data_path)[0] + ".*"):
        shutil.copy(path, tmp_path)
    return options(demo, tmp_path, caption_data_path=str(tmp_path / os.path.basename(demo.caption_data_path)))


def test_view_one_is_extracted_beside_view_zero_and_differs_from_it(own_demo):
    caption_path = own_demo["caption_data_path"]
    extract(caption_data_path=caption_path, img_path=own_demo["img_path"], backbone="mobilenet_v2",
            weights=mobilenet_weights(), num_workers=0, grid=7, view=1)
    assert os.path.isfile(features_path(caption_path, grid=True, view=1))
    ids = load_caption_data(caption_path)["ix2id"]
    plain, _ = load_features(caption_path, ids, grid=True)
    mirrored, meta = load_features(caption_path, ids, grid=True, view=1)
    assert meta["view"] == 1 and mirrored.shape == plain.shape
    assert not np.allclose(plain, mirrored, atol=1e-2)
    # a mirrored photo's regions are its plain regions in mirrored columns, near enough for a CNN
    mirrored_back = np.asarray(mirrored, np.float32).reshape(len(ids), 7, 7, -1)[:, :, ::-1].reshape(plain.shape)
    closer = np.abs(mirrored_back - plain).mean() < np.abs(np.asarray(mirrored, np.float32) - plain).mean()
    assert closer


def test_training_reads_view_e_mod_n_in_epoch_e(own_demo, monkeypatch):
    extract(caption_data_path=own_demo["caption_data_path"], img_path=own_demo["img_path"], backbone="mobilenet_v2",
            weights=mobilenet_weights(), num_workers=0, grid=7, view=1)
    seen = []
    cross_entropy_step = Trainer.cross_entropy_step

    def record_features(self, batch, sampling=0.0):
        seen.append((self.progress.epoch, self.train_split.features is self.views[1]))
        expected = torch.from_numpy(np.asarray(self.views[self.progress.epoch % 2][batch.rows], np.float32))
        assert torch.equal(batch.inputs.cpu(), expected)
        return cross_entropy_step(self, batch, sampling)

    monkeypatch.setattr(Trainer, "cross_entropy_step", record_features)
    train(**{**own_demo, "epoch": 3, "feature_views": 2, "eval_size": 0, "metric": "val_loss"})
    assert {epoch: mirrored for epoch, mirrored in seen} == {0: False, 1: True, 2: False}


def test_a_view_that_was_not_extracted_is_one_line_before_training(own_demo):
    with pytest.raises(SystemExit, match=r"\.view1\.features\.npy: no features .* --view=1"):
        train(**{**own_demo, "feature_views": 2})
