import json
import os
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import feature_extract
from data_preprocess import process
from feature_extract import build_backbone, extract, features_path, image_transform, load_image


def make_images(folder):
    """One image per case: good ones in several modes, and bad ones of several kinds."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels)
    rgb.save(folder / "rgb.jpg")
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(folder / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    rgb.save(folder / "exif.jpg", exif=exif)
    (folder / "corrupt.jpg").write_bytes(b"not an image at all")
    (folder / "truncated.jpg").write_bytes((folder / "rgb.jpg").read_bytes()[:300])
    return {"good": ["rgb.jpg", "gray.png", "rgba.png", "palette.png", "cmyk.jpg", "sixteen.png", "exif.jpg"],
            "bad": ["corrupt.jpg", "truncated.jpg", "missing.jpg"]}


@pytest.fixture
def dataset(tmp_path):
    names = make_images(tmp_path)
    order = names["good"][:3] + names["bad"] + names["good"][3:]
    entries = [{"image_id": name, "caption": ["一只猫"]} for name in order]
    (tmp_path / "a.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    caption_path = str(tmp_path / "c.pth")
    process(annotation_file=str(tmp_path / "a.json"), caption_data_path=caption_path, min_appear=1)
    return tmp_path, caption_path, order, names


def run_extract(folder, caption_path, **kwargs):
    extract(caption_data_path=caption_path, img_path=str(folder), backbone="mobilenet_v2", weights="none",
            batch_size=4, num_workers=0, **kwargs)


def test_rows_follow_ix2id_and_bad_images_are_reported(dataset, capsys):
    folder, caption_path, order, names = dataset
    torch.manual_seed(0)
    run_extract(folder, caption_path)
    features = np.load(features_path(caption_path))
    meta = json.loads(open(features_path(caption_path).replace(".npy", ".json")).read())
    assert features.dtype == np.float16 and features.shape == (len(order), 1280)
    bad_rows = {int(row) for row in meta["bad"]}
    assert bad_rows == {order.index(name) for name in names["bad"]}
    report = open(features_path(caption_path).replace(".npy", ".bad.tsv")).read()
    assert all(name in report for name in names["bad"]) and "missing.jpg" in capsys.readouterr().err
    # row i is image ix2id[i]: recompute two rows with the same (seeded) random network
    torch.manual_seed(0)
    network = build_backbone("mobilenet_v2", "none")
    for name in ("rgb.jpg", "palette.png"):
        with torch.inference_mode():
            expected = network(image_transform(load_image(folder / name)).unsqueeze(0))[0]
        np.testing.assert_allclose(features[order.index(name)], expected.numpy(), rtol=0.02, atol=0.02)


def test_convertible_modes_become_upright_rgb(dataset):
    folder, _, _, names = dataset
    for name in names["good"]:
        assert load_image(folder / name).mode == "RGB"
    assert load_image(folder / "exif.jpg").size == (60, 80)  # EXIF orientation applied


def test_decompression_bomb_is_rejected(tmp_path, monkeypatch):
    Image.new("RGB", (400, 400)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
        load_image(tmp_path / "big.png")


def test_interrupted_extraction_resumes_to_the_same_result(dataset, monkeypatch):
    folder, caption_path, _, _ = dataset
    torch.manual_seed(0)
    run_extract(folder, caption_path)
    complete = np.load(features_path(caption_path))
    os.remove(features_path(caption_path))

    calls = {"n": 0}
    real_save = feature_extract._save_progress

    def crash_after_two_batches(*args):
        real_save(*args)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(feature_extract, "_save_progress", crash_after_two_batches)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        run_extract(folder, caption_path)
    assert json.load(open(features_path(caption_path) + ".partial.json"))["done"] == 8
    monkeypatch.setattr(feature_extract, "_save_progress", real_save)
    torch.manual_seed(0)
    run_extract(folder, caption_path)
    np.testing.assert_array_equal(np.load(features_path(caption_path)), complete)
    assert not os.path.exists(features_path(caption_path) + ".partial")


def test_missing_weights_give_one_clear_message(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(Exception) as error:
        build_backbone("resnet50")
    message = str(error.value)
    assert "resnet50-11ad3fa6.pth" in message and str(tmp_path / "checkpoints") in message
    assert "Traceback" not in message


def test_local_weights_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    state = build_backbone("mobilenet_v2", "none").state_dict()
    torch.save(state, tmp_path / "w.pth")
    loaded = build_backbone("mobilenet_v2", str(tmp_path / "w.pth")).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(Exception, match="not mobilenet_v2 weights"):
        build_backbone("mobilenet_v2", str(tmp_path / "other.pth"))
