"""Property-based fuzzing of every input a user hands the toolkit, through the real command lines
(fire, in this process): option values, annotation files, images, feature files and checkpoints.

For each generated input a command either succeeds or exits with one line, `error: ...`, naming the
file or option; never a traceback, and the good files it would write over stay byte-identical.
The `ci` profile (the default) keeps the suite short; `HYPOTHESIS_PROFILE=long python -m pytest
tests/test_fuzz.py` runs twenty times the examples, randomised.
"""
import dataclasses
import io
import json
import os
import shutil

import fire
import numpy as np
import pytest
import torch
from conftest import options
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import config
import data_preprocess
import feature_extract
import main
from images import ImageFiles, features_path

settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=2000, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

COMMANDS = {"process": data_preprocess.process, "extract": feature_extract.extract, "train": main.train,
            "generate": main.generate, "evaluate": main.evaluate}


def run(*arguments):
    """Run a command line as `python X.py ...` would -> None on success, or the one-line error it exits with."""
    try:
        fire.Fire(COMMANDS, command=list(arguments))
    except SystemExit as exit_:
        message = str(exit_.code)
        assert exit_.code not in (0, None), "a command that fails must exit with status 1"
        assert message.startswith("error: ") and "\n" not in message, message
        return message
    return None


def snapshot(*paths):
    return {path: open(path, "rb").read() for path in paths}


# --- option values -------------------------------------------------------------------------------
VALUES = st.one_of(st.text(max_size=12), st.sampled_from(["nan", "inf", "-inf", "1e309", "-1", "0", "1.9", "True",
                                                          "false", "", "[1,2]", "{a: 1}", "None", "2.0", "1e3"]),
                   st.integers(-10 ** 6, 10 ** 6).map(str), st.floats(allow_nan=True).map(repr))
recorded = []


@config.command
def probe(opt):
    """Records the options it was given."""
    recorded.append(opt)


@given(name=st.sampled_from(sorted(config.FIELDS)), value=st.one_of(st.none(), VALUES), dashed=st.booleans())
def test_any_option_value_is_accepted_within_its_range_or_refused_in_one_line(name, value, dashed):
    flag = "--" + (name.replace("_", "-") if dashed else name)
    recorded.clear()
    try:
        fire.Fire({"probe": probe}, command=["probe", flag if value is None else f"{flag}={value}"])
    except SystemExit as exit_:
        message = str(exit_.code)
        assert message.startswith(f"error: {flag}") or message.startswith(f"error: --{name.replace('_', '-')}"), \
            message
        assert "\n" not in message
        return
    [opt] = recorded
    assert config.check(dataclasses.replace(opt)) == opt  # what was accepted is within every range
    assert isinstance(getattr(opt, name), {"str": str, "int": int, "float": float, "bool": bool}[
        config.FIELDS[name].type if isinstance(config.FIELDS[name].type, str) else config.FIELDS[name].type.__name__])


# --- annotation files ----------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=4), max_leaves=12)
CAPTIONS = st.lists(st.text(max_size=12) | st.sampled_from(["一个男人在骑马。", "。"]), max_size=5) | JSON


def annotation_files(image_ids):
    """Annotation file contents: entries with these image ids (or any text), any JSON, any bytes."""
    entry = st.fixed_dictionaries({"image_id": st.text(max_size=10) | st.sampled_from(image_ids),
                                   "caption": CAPTIONS})
    return st.one_of(
        st.lists(entry, max_size=5).map(lambda entries: json.dumps(entries, ensure_ascii=False).encode("utf-8")),
        JSON.map(lambda value: json.dumps(value).encode()),
        st.binary(max_size=200),
    )


ANNOTATIONS = annotation_files(["a.jpg", "../x.jpg", "/etc/p"])


@given(content=ANNOTATIONS, bom=st.booleans())
def test_any_annotation_file_is_encoded_or_refused_without_touching_the_output(demo, tmp_path_factory, content, bom):
    folder = tmp_path_factory.mktemp("annotations")
    annotations, output = str(folder / "a.json"), str(folder / "caption.pth")
    open(annotations, "wb").write((b"\xef\xbb\xbf" if bom else b"") + content)
    shutil.copy(demo.caption_data_path, output)
    before = snapshot(annotations, output)
    error = run("process", f"--annotation-file={annotations}", f"--caption-data-path={output}", "--min-appear=1")
    if error:
        assert "a.json" in error, error
        assert snapshot(annotations, output) == before
    else:
        assert snapshot(annotations) == {annotations: before[annotations]}
        data = torch.load(output, weights_only=True)
        assert data["ix2id"] and all(captions for captions in data["caption"])



@given(content=annotation_files(["val_0000.jpg", "val_0001.jpg", "train_0000.jpg"]))
def test_any_extra_text_is_added_or_refused_and_never_changes_the_references(demo, tmp_path_factory, content):
    """The references: the same images, sentences and (every word being known at --min-appear=1)
    captions as without the extra text."""
    folder = tmp_path_factory.mktemp("extra")
    annotations = os.path.join(os.path.dirname(demo.caption_data_path), "val.json")
    extra, output, alone = str(folder / "x.json"), str(folder / "caption.pth"), str(folder / "alone.pth")
    open(extra, "wb").write(content)
    shutil.copy(demo.caption_data_path, output)
    before = snapshot(output)
    error = run("process", f"--annotation-file={annotations}", f"--extra-annotation-file={extra}",
                f"--caption-data-path={output}", "--min-appear=1")
    if error:
        assert "x.json" in error, error
        assert snapshot(output) == before
        return
    assert run("process", f"--annotation-file={annotations}", f"--caption-data-path={alone}", "--min-appear=1") is None
    data, without = (torch.load(path, weights_only=True) for path in (output, alone))
    assert data["ix2id"] == without["ix2id"] and data["sentences"] == without["sentences"]
    assert [[[data["ix2word"][ix] for ix in caption] for caption in row] for row in data["caption"]] == [
        [[without["ix2word"][ix] for ix in caption] for caption in row] for row in without["caption"]]
    assert len(data["extra_caption"]) == len(data["ix2id"]) and any(data["extra_caption"])

# --- images --------------------------------------------------------------------------------------
@st.composite
def image_files(draw):
    """Bytes of an image file: any mode, size (strips included), format, perhaps cut short; or noise."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I;16", "I", "F", "CMYK", "LA"]))
    size = draw(st.sampled_from([(1, 1), (1, 60000), (60000, 1), (2, 7000)]) |
                st.tuples(st.integers(1, 400), st.integers(1, 400)))
    image = Image.new(mode, size, draw(st.integers(0, 255)))
    kind = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]))
    buffer = io.BytesIO()
    try:
        image.save(buffer, kind)
    except (OSError, ValueError, KeyError):  # a mode this format cannot store
        image.convert("RGB").save(buffer, "PNG")
    data = buffer.getvalue()
    return data[:draw(st.integers(0, len(data)))] if draw(st.booleans()) else data


@given(data=image_files(), backbone=st.sampled_from(["mobilenet_v2", "efficientnet_lite2"]))
def test_any_image_file_gives_pixels_or_an_error_never_an_exception(tmp_path_factory, data, backbone):
    path = tmp_path_factory.mktemp("image") / "photo.jpg"
    path.write_bytes(data)
    pixels, error = ImageFiles([str(path)], backbone)[0]
    size = 260 if backbone == "efficientnet_lite2" else 224
    assert pixels.shape == (size, size, 3) and pixels.dtype == torch.uint8
    assert isinstance(error, str) and "\n" not in error


# --- feature files -------------------------------------------------------------------------------
DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.bool_, np.complex64, np.uint8])
NEAR = {"rows": st.just(120) | st.sampled_from([0, 1, 119, 121]),  # half of them what extraction writes
        "shape": st.just((1280,)) | st.sampled_from([(), (7, 1280), (1, 2, 3), (1281,)])}
ARRAYS = st.builds(lambda dtype, rows, shape: np.ones((rows, *shape), dtype=dtype), DTYPES, NEAR["rows"],
                   NEAR["shape"])
META_KEYS = ["backbone", "weights", "num_images", "feature_dim", "grid", "img_path", "image_ids_sha1", "bad"]


@st.composite
def feature_damage(draw):
    """(what to write as the .npy: an array, bytes, 'truncate' or None to keep it; as the .json: JSON,
    bytes, a (key, new value or KeyError) change, or None to keep it); one of them or both."""
    which = draw(st.sampled_from(["npy", "meta", "both"]))
    npy = draw(ARRAYS | st.binary(max_size=200) | st.just("truncate")) if which != "meta" else None
    meta = draw(st.tuples(st.sampled_from(META_KEYS), st.just(KeyError) | JSON) | st.binary(max_size=100) | JSON
                ) if which != "npy" else None
    return npy, meta


def damage_features(path, npy, meta):
    meta_path = path.replace(".npy", ".json")
    if isinstance(npy, np.ndarray):
        np.save(path, npy)
    elif npy == "truncate":
        os.truncate(path, os.path.getsize(path) // 3)
    elif npy is not None:
        open(path, "wb").write(npy)
    if isinstance(meta, tuple):
        saved = json.load(open(meta_path))
        key, value = meta
        saved.pop(key) if value is KeyError else saved.update({key: value})
        json.dump(saved, open(meta_path, "w"))
    elif isinstance(meta, bytes):
        open(meta_path, "wb").write(meta)
    elif meta is not None:
        json.dump(meta, open(meta_path, "w"))


@given(damage=feature_damage())
def test_any_damaged_feature_file_is_refused_in_one_line(demo, tmp_path_factory, damage):
    folder = tmp_path_factory.mktemp("features")
    caption = str(folder / "caption.pth")
    shutil.copy(demo.caption_data_path, caption)
    for suffix in (".npy", ".json"):
        shutil.copy(features_path(demo.caption_data_path).replace(".npy", suffix),
                    features_path(caption).replace(".npy", suffix))
    damage_features(features_path(caption), *damage)
    error = run("train", f"--caption-data-path={caption}", "--epoch=0", "--scst-epoch=0", "--eval-size=0",
                "--metric=val_loss", f"--checkpoint-dir={folder / 'checkpoints'}", f"--log-dir={folder / 'logs'}",
                "--vis-port=1", "--vis-timeout=0.1")
    if error:
        assert "caption" in error, error
    else:  # accepted: what was written is what training can read
        features = np.load(features_path(caption))
        assert features.dtype in (np.float16, np.float32) and features.shape == (120, 1280)


# --- checkpoints ---------------------------------------------------------------------------------
TENSORS = st.builds(lambda dtype, shape, fill: torch.full(shape, fill).to(dtype),
                    st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]),
                    st.sampled_from([(), (3,), (2, 2)]), st.sampled_from([0.0, 1.0, float("nan"), float("inf")]))


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-trained")
    main.train(**options(demo, folder, epoch=1, eval_size=0, metric="val_loss"))
    return torch.load(folder / "checkpoints" / "last.pth", weights_only=True)


@given(data=st.data())
def test_any_damaged_checkpoint_captions_or_is_refused_in_one_line(demo, trained, tmp_path_factory, capsys, data):
    checkpoint = {key: dict(value) if isinstance(value, dict) else value for key, value in trained.items()}
    checkpoint["ix2word"] = list(trained["ix2word"])
    place = data.draw(st.sampled_from(["", "config", "feature", "model"]))
    target = checkpoint[place] if place else checkpoint
    key = data.draw(st.sampled_from(sorted(target)))
    value = data.draw(st.just(KeyError) | st.none() | JSON | TENSORS)
    if value is KeyError:
        del target[key]
    else:
        target[key] = value
    path = tmp_path_factory.mktemp("checkpoint") / "damaged.pth"
    torch.save(checkpoint, path)
    capsys.readouterr()
    error = run("generate", f"--img={os.path.join(demo.img_path, 'val_0001.jpg')}", f"--model-ckpt={path}",
                "--num-workers=0")
    if error:
        assert "damaged.pth" in error, error
    else:
        [line] = capsys.readouterr().out.splitlines()
        assert line.split("\t")[1]  # a caption, never an empty one
