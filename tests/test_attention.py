"""The attending captioners (attention, updown) end to end, and the attention maps they draw."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import options
from PIL import Image

from images import features_path
from main import generate, train
from model import checksum, load_checkpoint
from visualize import TITLE_HEIGHT, attention_figure, cjk_font

SIZE = 224
needs_cjk_font = pytest.mark.skipif(cjk_font() is None, reason="no CJK font (install.sh installs fonts-wqy-zenhei)")


def focused(region, regions=49):
    weights = torch.full((regions,), 0.001)
    weights[region] = 1.0
    return weights / weights.sum()


def panel(figure, index, columns=5):
    """The picture part of panel `index` as a float array (H, W, 3)."""
    x, y = index % columns * SIZE, index // columns * (SIZE + TITLE_HEIGHT) + TITLE_HEIGHT
    return np.asarray(figure.crop((x, y, x + SIZE, y + SIZE)), dtype=np.float32)


@needs_cjk_font
def test_attention_png_has_one_panel_per_word_and_follows_the_attention(tmp_path):
    photo = Image.new("RGB", (300, 200), (200, 180, 160))
    words = [("男人", focused(0)), ("骑", focused(48)), ("马", torch.full((49,), 1 / 49))]
    attention_figure(photo, words).save(tmp_path / "map.png")
    figure = Image.open(tmp_path / "map.png").convert("RGB")
    assert figure.size == (5 * SIZE, SIZE + TITLE_HEIGHT)  # the photo + 3 words fit one row of 5
    assert (panel(figure, 4) == 255).all()  # no fifth panel
    np.testing.assert_allclose(panel(figure, 0), np.asarray(photo.resize((SIZE, SIZE)), dtype=np.float32))
    first, second, uniform = (panel(figure, i).mean(-1) for i in (1, 2, 3))
    top_left, bottom_right = (slice(0, 32), slice(0, 32)), (slice(-32, None), slice(-32, None))
    assert first[top_left].mean() > 2 * first[bottom_right].mean()  # "男人" looked at the top left
    assert second[bottom_right].mean() > 2 * second[top_left].mean()  # "骑" at the bottom right
    assert uniform.std() < 1.0  # evenly everywhere
    title = np.asarray(figure.crop((SIZE, 0, 2 * SIZE, TITLE_HEIGHT)).convert("L"))
    assert (title < 128).sum() > 30  # the word is written above its panel


@needs_cjk_font
@pytest.mark.parametrize("kind", ["attention", "updown"])
def test_attending_model_trains_self_critically_and_draws_where_it_looked(demo, tmp_path, capsys, kind):
    train(**options(demo, tmp_path, model=kind, epoch=2, scst_epoch=1, lr=3e-3, plot_every=3))
    checkpoint = load_checkpoint(str(tmp_path / "checkpoints" / "best.pth"))
    assert checkpoint["config"]["model"] == kind and checkpoint["feature"]["grid"] == 7
    log = [json.loads(line) for line in open(tmp_path / "logs" / "caption.metrics.jsonl")]
    assert {"train_loss", "train_reward", "CIDEr-D"} <= {r["name"] for r in log}
    recorded = [json.loads(line)[1] for line in open(tmp_path / "logs" / "caption.visdom.log")]
    assert any(message.get("win") == "attention" for message in recorded)  # the maps on the dashboard

    capsys.readouterr()
    image = os.path.join(demo.img_path, "val_0002.jpg")
    generate(**options(demo, tmp_path, img=image, attention_map=str(tmp_path / "maps")))  # no --model needed
    caption = capsys.readouterr().out.strip().split("\t")[1]
    figure = Image.open(tmp_path / "maps" / "val_0002.attention.png")
    panels = 1 + len(caption_words(caption, checkpoint))
    assert figure.size == (5 * SIZE, -(-panels // 5) * (SIZE + TITLE_HEIGHT))


def caption_words(caption, checkpoint):
    """Split a generated caption back into the vocabulary's words (greedy longest match)."""
    vocabulary, words = set(checkpoint["ix2word"]), []
    while caption:
        word = next(caption[:n] for n in range(len(caption), 0, -1) if caption[:n] in vocabulary)
        words.append(word)
        caption = caption[len(word):]
    return words


def test_attention_needs_region_features(demo, tmp_path):
    pooled_only = str(tmp_path / "caption.pth")
    shutil.copy(demo.caption_data_path, pooled_only)
    shutil.copy(features_path(demo.caption_data_path), features_path(pooled_only))
    meta = json.load(open(features_path(demo.caption_data_path).replace(".npy", ".json")))
    json.dump({**meta, "grid": 0}, open(features_path(pooled_only).replace(".npy", ".json"), "w"))
    with pytest.raises(SystemExit, match="extracted without region features.*--grid=7"):
        train(**options(demo, tmp_path, model="attention", caption_data_path=pooled_only, val_caption_data_path=""))


def test_pooled_checkpoint_has_no_attention_to_draw(demo, tmp_path):
    train(**options(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss"))
    with pytest.raises(SystemExit, match="the pooled model has no attention to show"):
        generate(**options(demo, tmp_path, img=os.path.join(demo.img_path, "val_0001.jpg"),
                           attention_map=str(tmp_path / "maps")))


def test_unknown_model_is_refused(demo, tmp_path):
    with pytest.raises(SystemExit, match="--model=lstm: choose one of pooled, attention, updown, transformer"):
        train(**options(demo, tmp_path, model="lstm"))


@pytest.fixture(scope="module")
def attention_checkpoint(demo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("attention")
    train(**options(demo, folder, model="attention", epoch=1, eval_size=0, metric="val_loss"))
    return str(folder / "checkpoints" / "best.pth")


def test_a_region_model_checkpoint_without_regions_is_refused(demo, attention_checkpoint, tmp_path):
    checkpoint = torch.load(attention_checkpoint, weights_only=True)
    checkpoint["feature"]["grid"] = 0
    checkpoint["checksum"] = checksum(checkpoint)  # written so: not damaged, wrong
    torch.save(checkpoint, tmp_path / "grid0.pth")
    with pytest.raises(SystemExit, match="grid0.pth: .*its attention model reads region features, but its features "
                                         r"have none \(grid 0\)"):
        generate(**options(demo, img=os.path.join(demo.img_path, "val_0001.jpg"),
                           model_ckpt=f"{attention_checkpoint},{tmp_path / 'grid0.pth'}"))


@needs_cjk_font
def test_photos_of_one_name_get_a_map_each(demo, attention_checkpoint, tmp_path, capsys):
    """p.jpg and p.png in one folder: two maps, neither over the other."""
    (tmp_path / "photos").mkdir()
    photo = Image.open(os.path.join(demo.img_path, "val_0001.jpg"))
    photo.save(tmp_path / "photos" / "p.jpg")
    photo.save(tmp_path / "photos" / "p.png")
    generate(**options(demo, img=str(tmp_path / "photos"), model_ckpt=attention_checkpoint,
                       attention_map=str(tmp_path / "maps")))
    assert sorted(os.listdir(tmp_path / "maps")) == ["p-2.attention.png", "p.attention.png"]
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("attention map:")]
    assert len(said) == len(set(said)) == 2


@pytest.mark.parametrize("clash", ["folder", "output"])
def test_a_map_path_that_cannot_be_written_is_refused_before_captioning(demo, attention_checkpoint, tmp_path,
                                                                        capsys, clash):
    if clash == "folder":
        (tmp_path / "maps" / "val_0001.attention.png").mkdir(parents=True)
        output, message = "", "val_0001.attention.png: is a folder; the attention map of .*val_0001.jpg goes there"
    else:
        output, message = str(tmp_path / "maps"), "--output=.*maps and --attention-map=.*maps: one path"
    with pytest.raises(SystemExit, match=message):
        generate(**options(demo, img=os.path.join(demo.img_path, "val_0001.jpg"), model_ckpt=attention_checkpoint,
                           attention_map=str(tmp_path / "maps"), output=output))
    assert capsys.readouterr().out == ""  # nothing captioned
    assert os.path.isdir(tmp_path / "maps") == (clash == "folder")  # no folder made where --output goes
