import json
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from conftest import ROOT, mobilenet_weights
from PIL import Image

import images
from data_preprocess import process
from dataset import load_split
from feature_extract import extract
from images import build_backbone, features_path, image_transform, load_image, pooled


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


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random MobileNetV2 whose BatchNorm statistics are set on random images: unlike a freshly
    initialised one (outputs near 1e-8, zero in float16) its features are of order one."""
    torch.manual_seed(0)
    network = torchvision.models.mobilenet_v2()
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the batches seen
    with torch.no_grad():
        network.train()(torch.randn(16, 3, 224, 224))
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.pth"
    torch.save(network.state_dict(), path)
    return str(path)


def run_extract(folder, caption_path, weights, **kwargs):
    extract(caption_data_path=caption_path, img_path=str(folder), backbone="mobilenet_v2", weights=weights,
            batch_size=4, num_workers=0, **kwargs)


def test_rows_follow_ix2id_and_bad_images_are_reported(dataset, weights, capsys):
    folder, caption_path, order, names = dataset
    torch.manual_seed(0)
    run_extract(folder, caption_path, weights)
    features = np.load(features_path(caption_path))
    meta = json.loads(open(features_path(caption_path).replace(".npy", ".json")).read())
    assert features.dtype == np.float16 and features.shape == (len(order), 1280)
    assert np.abs(features[order.index("rgb.jpg")]).mean() > 0.01  # real numbers, not float16 zeros
    bad_rows = {int(row) for row in meta["bad"]}
    assert bad_rows == {order.index(name) for name in names["bad"]}
    report = open(features_path(caption_path).replace(".npy", ".bad.tsv")).read()
    assert all(name in report for name in names["bad"]) and "missing.jpg" in capsys.readouterr().err
    # row i is image ix2id[i]: recompute two rows with the same (seeded) random network
    network = build_backbone("mobilenet_v2", weights)
    for name in ("rgb.jpg", "palette.png"):
        with torch.inference_mode():
            expected = pooled(network(image_transform("mobilenet_v2")(load_image(folder / name)).unsqueeze(0)))[0]
        np.testing.assert_allclose(features[order.index(name)], expected.numpy(), rtol=0.02, atol=0.02)


def test_convertible_modes_become_upright_rgb(dataset):
    folder, _, _, names = dataset
    for name in names["good"]:
        assert load_image(folder / name).mode == "RGB"
    assert load_image(folder / "exif.jpg").size == (60, 80)  # EXIF orientation applied


def test_large_jpegs_are_decoded_at_a_reduced_scale_close_to_the_full_decode(tmp_path):
    """A JPEG of twice the crop or more is decoded smaller by libjpeg (upright all the same); the
    pixels stay within a grey level or two of the full decode's. Smaller ones are decoded in full."""
    rng = np.random.default_rng(0)
    scene = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    scene.resize((1000, 750), Image.BICUBIC).save(tmp_path / "large.jpg", quality=95, exif=exif)
    scene.resize((400, 300), Image.BICUBIC).save(tmp_path / "small.jpg", quality=95)
    files = images.ImageFiles([str(tmp_path / "large.jpg"), str(tmp_path / "small.jpg")], "mobilenet_v2")
    transform = image_transform("mobilenet_v2")
    large, small = (transform.crop(load_image(tmp_path / name)) for name in ("large.jpg", "small.jpg"))
    assert torch.equal(files[1][0], small)
    assert not torch.equal(files[0][0], large)
    assert (files[0][0].float() - large.float()).abs().mean() < 2.0


@pytest.mark.parametrize("side", [150, 400])  # over the limit (a warning in PIL), over twice it (an error)
def test_decompression_bomb_is_listed_and_extraction_goes_on(dataset, weights, monkeypatch, side):
    folder, caption_path, order, _ = dataset
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    Image.new("RGB", (side, side)).save(folder / "rgb.jpg")  # the first image becomes a "bomb"
    run_extract(folder, caption_path, weights)
    meta = json.load(open(features_path(caption_path).replace(".npy", ".json")))
    assert "DecompressionBomb" in meta["bad"][str(order.index("rgb.jpg"))]
    assert len(meta["bad"]) == 4  # the bomb and the three bad files: the small images are still read


def stored_files(caption_path):
    """Every array an extraction wrote for caption_path: {path: array}."""
    paths = [features_path(caption_path), features_path(caption_path, grid=True)]
    paths += [images.scales_path(path) for path in paths]
    return {path: np.load(path) for path in paths if os.path.exists(path)}


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_killed_extraction_resumes_to_the_same_result(dataset, weights, dtype):
    """A real extraction process is killed mid-way; the rerun resumes and equals an uninterrupted run."""
    folder, caption_path, order, _ = dataset
    torch.manual_seed(0)
    command = [sys.executable, "feature_extract.py", "extract", f"--caption-data-path={caption_path}",
               f"--img-path={folder}", "--backbone=mobilenet_v2", f"--weights={weights}",
               "--batch-size=1", "--num-workers=0", "--grid=7", f"--dtype={dtype}"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    complete = stored_files(caption_path)
    assert len(complete) == (2 if dtype == "float16" else 4)
    os.remove(features_path(caption_path))

    progress = features_path(caption_path) + ".partial.0-of-1.json"  # how far process 0 of 1 got
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and not (os.path.exists(progress) and json.load(open(progress))["done"] >= 3):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = json.load(open(progress))["done"]
    assert 3 <= done < len(order)
    resumed = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    assert f"resuming {features_path(caption_path)} at image" in resumed.stdout
    resumed_files = stored_files(caption_path)
    assert resumed_files.keys() == complete.keys()
    for path, array in complete.items():
        np.testing.assert_array_equal(resumed_files[path], array)
    assert not os.path.exists(features_path(caption_path) + ".partial")


@pytest.mark.parametrize("grid", [0, 7])
def test_int8_features_are_the_float16_ones_within_half_a_scale_at_half_the_size(dataset, weights, grid):
    folder, caption_path, order, names = dataset
    run_extract(folder, caption_path, weights, grid=grid)
    half = stored_files(caption_path)
    run_extract(folder, caption_path, weights, grid=grid, dtype="int8")  # another dtype: extracted again
    assert json.load(open(features_path(caption_path).replace(".npy", ".json")))["dtype"] == "int8"
    assert len(stored_files(caption_path)) == 2 * len(half)
    for regions in [False, True][:len(half)]:
        path = features_path(caption_path, grid=regions)
        codes, scales, values = np.load(path), np.load(images.scales_path(path)), half[path].astype(np.float32)
        assert codes.dtype == np.int8 and codes.shape == values.shape and scales.shape == values.shape[:-1]
        assert os.path.getsize(path) < 0.51 * values.size * 2
        _, features, _, usable = load_split(caption_path, grid=regions)
        read = features.read(usable)  # what training reads
        assert read.dtype == np.float32 and np.abs(read).max() > 0.1
        assert np.all(np.abs(read - values[usable]) <= scales[usable][..., None] * 0.5001)
    run_extract(folder, caption_path, weights, grid=grid)  # back to float16: the same arrays, no scales left
    assert {path: array.tobytes() for path, array in stored_files(caption_path).items()} == {
        path: array.tobytes() for path, array in half.items()}


def test_unreadable_images_are_left_out_of_training(dataset, weights):
    folder, caption_path, order, names = dataset
    run_extract(folder, caption_path, weights)
    _, _, _, usable = load_split(caption_path)
    assert [order[row] for row in usable] == [name for name in order if name not in names["bad"]]


def test_missing_weights_give_one_clear_message(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(Exception) as error:
        build_backbone("resnet50")
    message = str(error.value)
    assert "resnet50-11ad3fa6.pth" in message and str(tmp_path / "checkpoints") in message
    assert "Traceback" not in message
    assert os.listdir(tmp_path / "checkpoints") == []  # no partial download left behind


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_weights_file_planted_in_the_cache_never_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    planted = tmp_path / "checkpoints" / "mobilenet_v2-b0353104.pth"  # the name torchvision's file has
    planted.parent.mkdir()
    planted.write_bytes(pickle.dumps(Exploit(tmp_path / "ran")))
    with pytest.raises(Exception, match="mobilenet_v2-b0353104.pth: sha256 .* does not match its published hash"):
        build_backbone("mobilenet_v2", "default")
    with pytest.raises(Exception, match="not a readable weights file"):
        build_backbone("mobilenet_v2", str(planted))  # a local file is not hash-named: weights_only refuses it
    assert not (tmp_path / "ran").exists()


@pytest.mark.skipif(mobilenet_weights() == "none", reason="MobileNetV2 ImageNet weights not installed (install.sh)")
def test_torchvision_weights_pass_the_check_and_are_recorded_by_name(dataset):
    folder, caption_path, _, _ = dataset
    extract(caption_data_path=caption_path, img_path=str(folder), backbone="mobilenet_v2", weights="default",
            batch_size=4, num_workers=0)
    meta = json.load(open(features_path(caption_path).replace(".npy", ".json")))
    assert meta["weights"] == "IMAGENET1K_V1"  # what "default" stood for, so generate uses the same


def test_local_weights_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    state = torchvision.models.mobilenet_v2().state_dict()  # the whole network, classifier included
    torch.save(state, tmp_path / "w.pth")
    loaded = build_backbone("mobilenet_v2", str(tmp_path / "w.pth")).state_dict()  # its trunk: features.*
    assert len(loaded) > 100 and all(torch.equal(value, state[f"features.{key}"]) for key, value in loaded.items())
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(Exception, match="not mobilenet_v2 weights"):
        build_backbone("mobilenet_v2", str(tmp_path / "other.pth"))


@pytest.mark.parametrize("grid", [7, 3])
def test_region_features_are_a_grid_of_the_map_whose_mean_is_the_pooled_feature(dataset, weights, capsys, grid):
    folder, caption_path, order, names = dataset
    run_extract(folder, caption_path, weights, grid=grid)
    assert f"{len(order)} x {grid * grid} x 1280 float16" in capsys.readouterr().out  # the size, said up front
    features, regions = np.load(features_path(caption_path)), np.load(features_path(caption_path, grid=True))
    assert regions.dtype == np.float16 and regions.shape == (len(order), grid * grid, 1280)
    good = [order.index(name) for name in names["good"]]
    assert np.abs(regions[good].astype(np.float32).std(1)).mean() > 0.01  # regions differ from each other
    if grid == 7:  # the backbone's own 7x7 map: its mean is exactly what the pooled file holds
        np.testing.assert_allclose(regions[good].astype(np.float32).mean(1), features[good], rtol=0.01, atol=0.01)


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite2"])
def test_image_transform_is_torchvisions_to_the_bit(backbone):
    """The transform written without torchvision gives exactly what torchvision's gives."""
    spec = images.BACKBONES[backbone]
    reference = torchvision.transforms.Compose([
        torchvision.transforms.Resize(spec.size), torchvision.transforms.CenterCrop(spec.size),
        torchvision.transforms.ToTensor(), torchvision.transforms.Normalize(spec.mean, spec.std)])
    rng = np.random.default_rng(0)
    for width, height in [(224, 224), (300, 200), (200, 300), (500, 375), (225, 224), (101, 77)]:
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        assert torch.equal(image_transform(backbone)(image), reference(image)), (width, height)


def test_a_batch_of_crops_is_normalised_channels_last_without_a_copy():
    """Workers send (S, S, 3) pixels; the batch they make comes out channels_last, as the backbone
    runs fastest, with the values of the one-image transform."""
    transform = image_transform("mobilenet_v2")
    rng = np.random.default_rng(1)
    photos = [Image.fromarray(rng.integers(0, 255, (300, 260, 3), dtype=np.uint8)) for _ in range(3)]
    pixels = torch.stack([transform.crop(photo) for photo in photos])
    assert pixels.shape == (3, 224, 224, 3) and pixels.dtype == torch.uint8
    batch = transform.normalize(pixels)
    assert batch.shape == (3, 3, 224, 224) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack([transform(photo) for photo in photos]))


@pytest.mark.skipif(not hasattr(os, "nice"), reason="no process priorities here")
@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite2"])
def test_the_cpu_inference_backbone_has_its_batch_norms_folded_and_the_same_features(backbone):
    torch.manual_seed(0)
    trunk = build_backbone(backbone, "none")
    for module in trunk.modules():  # statistics far from the identity, as trained ones are
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    size = images.BACKBONES[backbone].size
    batch = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = trunk(batch)
        network = images.prepare_backbone(trunk, backbone, torch.device("cpu"))
        assert "batch_norm" not in str(network.inlined_graph) and "conv" in str(network.inlined_graph)
        torch.testing.assert_close(network(batch.contiguous(memory_format=torch.channels_last)), expected,
                                   rtol=1e-4, atol=1e-4)


def test_image_workers_read_at_the_lowest_priority_on_the_cpu(monkeypatch):
    """On the CPU, encode_images' DataLoader workers yield the cores to the forward pass."""
    def priority_as_error(files, index):  # what a worker reports back: its own niceness
        return torch.zeros(224, 224, 3, dtype=torch.uint8), str(os.nice(0))
    monkeypatch.setattr(images.ImageFiles, "__getitem__", priority_as_error)
    batches = images.encode_images(torch.nn.Identity(), "mobilenet_v2", ["photo.jpg"] * 8, torch.device("cpu"),
                                   batch_size=4, num_workers=2)
    reported = [error for _, _, errors in batches for error in errors]
    assert reported == [str(min(19, os.nice(0) + 19))] * 8


@pytest.mark.skipif(images._GLIBC is None, reason="malloc_trim is glibc's; elsewhere the call does nothing")
def test_release_freed_memory_gives_a_freed_heap_back_to_the_os():
    """Freed heap below a live block stays resident until release_freed_memory hands it back."""
    def resident_mb():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    blocks = [torch.ones(25_000) for _ in range(2000)]  # 100 kB each: from the heap, not mmap; 200 MB
    keep = blocks[-1]  # the top of the heap stays in use, so glibc cannot shrink it on free
    del blocks
    before = resident_mb()
    images.release_freed_memory()
    assert before - resident_mb() > 100, (before, resident_mb())
    assert keep.sum() == 25_000


def test_captioning_backbone_is_kept_as_torchscript_with_the_same_features(monkeypatch, tmp_path):
    """The first load_backbone saves the trunk as TorchScript; a later one, in a fresh process, loads
    it without importing torchvision and computes the same features."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # for the fresh process
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch" / "hub"))
    torch.manual_seed(2)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "w.pth")
    weights = str(tmp_path / "w.pth")
    image = image_transform("mobilenet_v2")(Image.new("RGB", (224, 224), (200, 30, 90))).unsqueeze(0)
    first = images.load_backbone("mobilenet_v2", weights)
    assert os.path.isfile(images.traced_path("mobilenet_v2", weights))
    with torch.no_grad():
        expected = first(image)
    np.save(tmp_path / "image.npy", image.numpy())
    script = (f"import sys, numpy, torch, images\n"
              f"trunk = images.load_backbone('mobilenet_v2', {weights!r})\n"
              f"assert isinstance(trunk, torch.jit.ScriptModule) and 'torchvision' not in sys.modules\n"
              f"with torch.no_grad():\n"
              f"    features = trunk(torch.from_numpy(numpy.load({str(tmp_path / 'image.npy')!r})))\n"
              f"numpy.save({str(tmp_path / 'features.npy')!r}, features.numpy())\n")
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": ROOT})
    np.testing.assert_array_equal(np.load(tmp_path / "features.npy"), expected.numpy())


def test_a_batch_encoded_in_forward_chunks_is_each_photo_encoded_alone():
    """On a CPU the backbone runs a few photos at a time: two chunks and one photo more give each photo
    its own features, in order."""
    torch.manual_seed(0)
    device, transform = torch.device("cpu"), image_transform("mobilenet_v2")
    count = 2 * images.CPU_FORWARD_PHOTOS_PER_THREAD * torch.get_num_threads() + 1
    assert len(images.forward_chunks(torch.zeros(count, 1), device)) == 3
    network = images.prepare_backbone(build_backbone("mobilenet_v2", mobilenet_weights()).eval(), "mobilenet_v2",
                                      device)
    pixels = torch.randint(0, 256, (count, transform.size, transform.size, 3), dtype=torch.uint8)
    together, regions = images.encode_pixels(network, transform, pixels, device, grid=2)
    assert together.shape == (count, 1280) and regions.shape == (count, 4, 1280)
    for index in range(count):
        alone, alone_regions = images.encode_pixels(network, transform, pixels[index:index + 1], device, grid=2)
        torch.testing.assert_close(together[index:index + 1], alone, rtol=0.01, atol=0.01)
        torch.testing.assert_close(regions[index:index + 1], alone_regions, rtol=0.01, atol=0.01)
    assert not torch.allclose(together[0], together[-1])  # different photos really differ
