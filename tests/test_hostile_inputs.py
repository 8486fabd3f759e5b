"""Hostile input, case by case, as a fuzz campaign and a review found it: every one gets one clear
line and exit status 1 before any long work, and nothing already written is lost."""
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch
from conftest import options
from PIL import Image

import images
from data_preprocess import process
from feature_extract import extract
from feature_reads import quantize
from images import features_path
from main import evaluate, generate, replay, train
from model import checksum, load_checkpoint


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """A checkpoint trained for one epoch on the demo data."""
    folder = tmp_path_factory.mktemp("trained")
    train(**options(demo, folder, epoch=1, eval_size=0, metric="val_loss"))
    return str(folder / "checkpoints" / "last.pth")


def one_line_error(error_info, *words):
    """The SystemExit of a command: one line, 'error: ...', naming each of words."""
    message = str(error_info.value)
    assert message.startswith("error: ") and "\n" not in message, message
    for word in words:
        assert str(word) in message, message
    return message


def copy_split(demo, folder, name="caption"):
    """A copy of the demo's training captions and their features, to damage."""
    target = str(folder / f"{name}.pth")
    shutil.copy(demo.caption_data_path, target)
    for suffix in (".features.npy", ".features.json", ".regions.npy"):
        shutil.copy(os.path.splitext(demo.caption_data_path)[0] + suffix, os.path.splitext(target)[0] + suffix)
    return target


def digests(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if (folder / name).is_file()}


# --- 1. nothing readable is not a success; good outputs are never replaced by worse ---
def test_extract_from_a_wrong_folder_stops_before_work_and_keeps_the_good_features(demo, tmp_path):
    caption = copy_split(demo, tmp_path)
    before = digests(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(SystemExit) as error:
        extract(caption_data_path=caption, img_path=str(tmp_path / "elsewhere"), backbone="efficientnet_lite2")
    one_line_error(error, "--img-path", "only 0 of the 120 images")
    assert digests(tmp_path) == before


def test_extract_of_mostly_unreadable_images_writes_nothing(demo, tmp_path):
    caption = copy_split(demo, tmp_path)
    broken = tmp_path / "images"
    broken.mkdir()
    for name in os.listdir(demo.img_path):
        (broken / name).write_bytes(b"\xff\xd8 not a jpeg")
    before = digests(tmp_path)
    with pytest.raises(SystemExit) as error:
        extract(caption_data_path=caption, img_path=str(broken), backbone="mobilenet_v2", num_workers=0, grid=7)
    one_line_error(error, "120 of the 120 images could not be read", "nothing was written")
    assert digests(tmp_path) == before  # the good features, their description; no partial files left


def test_captions_with_no_words_are_refused(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"image_id": "x.jpg", "caption": ["。", "  ", "。。"]}]))
    with pytest.raises(SystemExit) as error:
        process(annotation_file=str(tmp_path / "a.json"), caption_data_path=str(tmp_path / "c.pth"))
    one_line_error(error, "a.json", "no caption has a word")
    assert not (tmp_path / "c.pth").exists()


# --- 2. a caption has at least one word ---
def test_a_model_that_would_end_at_once_still_says_a_word(demo, trained, tmp_path, capsys):
    checkpoint = torch.load(trained, weights_only=True)
    end = checkpoint["ix2word"].index(checkpoint["end"])
    checkpoint["model"]["classifier.bias"][end] += 100.0  # </EOS> near certain at every step
    checkpoint["checksum"] = checksum(checkpoint)  # trained so, not damaged
    torch.save(checkpoint, tmp_path / "eager.pth")
    generate(**options(demo, tmp_path, img=os.path.join(demo.img_path, "val_0001.jpg"),
                       model_ckpt=str(tmp_path / "eager.pth")))
    path, caption = capsys.readouterr().out.strip().split("\t")
    assert caption and path.endswith("val_0001.jpg")


# --- 3. tiny files that would take gigabytes, files that would hang ---
@pytest.mark.parametrize("size", [(1, 60000), (60000, 1), (3, 5000)])
def test_extreme_strips_are_cut_before_resizing(tmp_path, size):
    Image.new("RGB", size, (10, 200, 30)).save(tmp_path / "strip.png")
    image = images.load_image(str(tmp_path / "strip.png"))
    assert max(images._bounded(image).size) <= images.MAX_ASPECT * min(size)
    pixels = images.image_transform("mobilenet_v2").crop(image)
    assert pixels.shape == (224, 224, 3) and (pixels[..., 1] == 200).all()


def test_a_fifo_is_skipped_in_a_folder_and_refused_by_name(demo, trained, tmp_path, capsys):
    shutil.copy(os.path.join(demo.img_path, "val_0001.jpg"), tmp_path / "good.jpg")
    os.mkfifo(tmp_path / "bad.jpg")
    generate(**options(demo, tmp_path, img=str(tmp_path), model_ckpt=trained))
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'good.jpg'}\t")
    with pytest.raises(SystemExit):
        generate(**options(demo, tmp_path, img=str(tmp_path / "bad.jpg"), model_ckpt=trained))
    assert "bad.jpg: OSError: not a regular file" in capsys.readouterr().err


# --- 4. JSON and .pth loaders ---
@pytest.mark.parametrize("text, reason", [("[" * 100000, "not valid JSON"),
                                          ('[{"image_id": "a.jpg", "caption": [' + "9" * 5000 + "]}]",
                                           "not valid JSON"),
                                          ("\udcff", "not UTF-8 text")])
def test_annotation_files_that_json_cannot_read_are_one_line(tmp_path, text, reason):
    (tmp_path / "a.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(SystemExit) as error:
        process(annotation_file=str(tmp_path / "a.json"), caption_data_path=str(tmp_path / "c.pth"))
    one_line_error(error, "a.json", reason)


def test_an_annotation_file_saved_with_a_bom_is_read_as_without(tmp_path):
    entries = [{"image_id": "a.jpg", "caption": ["一个男人在骑马", "一个人骑马"]}]
    text = json.dumps(entries, ensure_ascii=False)
    (tmp_path / "plain.json").write_text(text, encoding="utf-8")
    (tmp_path / "bom.json").write_text(text, encoding="utf-8-sig")
    for name in ("plain", "bom"):
        process(annotation_file=str(tmp_path / f"{name}.json"), caption_data_path=str(tmp_path / f"{name}.pth"),
                min_appear=1)
    plain, bom = (torch.load(tmp_path / f"{name}.pth", weights_only=True) for name in ("plain", "bom"))
    assert plain["caption"] == bom["caption"] and plain["ix2word"] == bom["ix2word"]


def test_a_vocabulary_file_that_is_empty_or_lacks_unknown_is_refused(demo, tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    data = torch.load(demo.caption_data_path, weights_only=True)
    torch.save({**data, "ix2word": [w for w in data["ix2word"] if w != "</UNKNOWN>"]}, tmp_path / "nounk.pth")
    annotations = os.path.join(os.path.dirname(demo.caption_data_path), "val.json")
    for name, reason in (("empty.pth", "not a readable caption data file"), ("nounk.pth", "lacks </UNKNOWN>")):
        with pytest.raises(SystemExit) as error:
            process(annotation_file=annotations, caption_data_path=str(tmp_path / "out.pth"),
                    vocab_from=str(tmp_path / name))
        one_line_error(error, name, reason)


@pytest.mark.parametrize("results", [[{"image_id": "val_0000.jpg", "caption": 5}],
                                     [{"image_id": "val_0000.jpg", "caption": None}],
                                     [{"image_id": "val_0000.jpg", "caption": ["a"]}], [], {"a": 1}])
def test_results_files_of_the_wrong_shape_are_one_line(demo, tmp_path, results):
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit) as error:
        evaluate(**options(demo, tmp_path, results=str(tmp_path / "results.json")))
    one_line_error(error, "results.json", "results file")


# --- 5. feature files and checkpoints are checked where they are loaded ---
def _truncate(path):
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) // 2)


FEATURE_DAMAGE = {
    "truncated": lambda npy, meta: _truncate(npy),
    "empty": lambda npy, meta: open(npy, "wb").close(),
    "object dtype": lambda npy, meta: np.save(npy, np.array([{"a": 1}] * 120, dtype=object)),
    "a folder": lambda npy, meta: (os.remove(npy), os.mkdir(npy)),
    "int8": lambda npy, meta: np.save(npy, np.ones((120, 1280), dtype=np.int8)),
    "complex": lambda npy, meta: np.save(npy, np.ones((120, 1280), dtype=np.complex64)),
    "3-D pooled": lambda npy, meta: np.save(npy, np.ones((120, 2, 1280), dtype=np.float16)),
    "meta without feature_dim": lambda npy, meta: json.dump(
        {k: v for k, v in json.load(open(meta)).items() if k != "feature_dim"}, open(meta + ".x", "w")),
    "meta a list": lambda npy, meta: json.dump([1, 2], open(meta + ".x", "w")),
    "meta not UTF-8": lambda npy, meta: open(meta + ".x", "wb").write(b'{"backbone": "\xff"}'),
}


@pytest.mark.parametrize("damage", FEATURE_DAMAGE)
def test_damaged_feature_files_are_refused_in_one_line(demo, tmp_path, damage):
    caption = copy_split(demo, tmp_path)
    npy = features_path(caption)
    meta = npy.replace(".npy", ".json")
    FEATURE_DAMAGE[damage](npy, meta)
    if os.path.exists(meta + ".x"):
        os.replace(meta + ".x", meta)
    with pytest.raises(SystemExit) as error:
        train(**options(demo, tmp_path, caption_data_path=caption, val_caption_data_path="", epoch=1))
    one_line_error(error, "caption.features")


def int8_copy(demo, folder):
    """A copy of the demo's training split whose features are stored as int8 with their scales."""
    caption = copy_split(demo, folder)
    for path in (features_path(caption), features_path(caption, grid=True)):
        codes, scales = quantize(torch.from_numpy(np.load(path).astype(np.float32)))
        np.save(path, codes)
        np.save(images.scales_path(path), scales)
    meta = features_path(caption).replace(".npy", ".json")
    json.dump({**json.load(open(meta)), "dtype": "int8"}, open(meta + ".x", "w"))
    os.replace(meta + ".x", meta)
    return caption


INT8_DAMAGE = {
    "scales missing": lambda npy: os.remove(images.scales_path(npy)),
    "a negative scale": lambda npy: np.save(images.scales_path(npy), -np.load(images.scales_path(npy))),
    "a NaN scale": lambda npy: np.save(images.scales_path(npy), np.load(images.scales_path(npy)) * np.nan),
    "a scale past float16's range": lambda npy: np.save(images.scales_path(npy), np.full(120, 1e30, np.float32)),
    "codes in Fortran order": lambda npy: np.save(npy, np.asfortranarray(np.load(npy))),
    "scales of another shape": lambda npy: np.save(images.scales_path(npy), np.ones(7, np.float32)),
    "float16 codes": lambda npy: np.save(npy, np.load(npy).astype(np.float16)),
    "dtype int4": lambda npy: json.dump({**json.load(open(npy.replace(".npy", ".json"))), "dtype": "int4"},
                                        open(npy.replace(".npy", ".json"), "w")),
    "dtype a list": lambda npy: json.dump({**json.load(open(npy.replace(".npy", ".json"))), "dtype": ["int8"]},
                                          open(npy.replace(".npy", ".json"), "w")),
}


@pytest.mark.parametrize("damage", INT8_DAMAGE)
def test_damaged_int8_features_are_refused_in_one_line(demo, tmp_path, damage):
    caption = int8_copy(demo, tmp_path)
    INT8_DAMAGE[damage](features_path(caption))
    with pytest.raises(SystemExit) as error:
        train(**options(demo, tmp_path, caption_data_path=caption, val_caption_data_path="", epoch=1))
    one_line_error(error, "caption.features")


def test_training_reads_int8_features(demo, tmp_path):
    caption = int8_copy(demo, tmp_path)
    train(**options(demo, tmp_path, caption_data_path=caption, model="attention", epoch=1, eval_size=0,
                    metric="val_loss"))
    assert os.path.isfile(tmp_path / "checkpoints" / "last.pth")


def _set(path):
    """A change to a checkpoint: keys of nested dicts joined by '/', the new value."""
    def change(checkpoint, value):
        *parents, key = path.split("/")
        target = checkpoint
        for parent in parents:
            target = target[parent]
        if value is KeyError:
            del target[key]
        else:
            target[key] = value
    return change


CHECKPOINT_DAMAGE = {
    "no backbone": (_set("feature/backbone"), KeyError, "feature description"),
    "feature None": (_set("feature"), None, "feature description"),
    "config a list": (_set("config"), [1], "config"),
    "hidden_size text": (_set("config/hidden_size"), "big", "--hidden-size"),
    "ix2word without </EOS>": (lambda c, _: c["ix2word"].remove("</EOS>"), None, "lacks </EOS>"),
    "float64 weights": (lambda c, _: c["model"].update({k: v.double() for k, v in c["model"].items()}), None,
                        "float32"),
    "NaN weights": (lambda c, _: c["model"]["classifier.weight"].fill_(float("nan")), None, "NaN"),
    "junk encoder": (_set("encoder"), {"conv.weight": torch.zeros(3)}, "fine-tuned encoder"),
}


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE)
def test_damaged_checkpoints_are_refused_in_one_line(demo, trained, tmp_path, damage):
    change, value, reason = CHECKPOINT_DAMAGE[damage]
    checkpoint = torch.load(trained, weights_only=True)
    change(checkpoint, value)
    checkpoint["checksum"] = checksum(checkpoint)  # written so, by a version with a bug, say
    torch.save(checkpoint, tmp_path / "damaged.pth")
    with pytest.raises(SystemExit) as error:
        generate(**options(demo, tmp_path, img=os.path.join(demo.img_path, "val_0001.jpg"),
                           model_ckpt=str(tmp_path / "damaged.pth")))
    one_line_error(error, "damaged.pth", reason)


def flip_bytes(data, start, count=4):
    return data[:start] + bytes(b ^ 0xFF for b in data[start:start + count]) + data[start + count:]


@pytest.mark.parametrize("where", [0.3, 0.5, 0.7])
def test_a_checkpoint_with_flipped_bits_is_refused_as_damaged(demo, trained, tmp_path, where):
    """A bad disk or copy: 4 bytes of the weights flipped (torch.load reads them without complaint)."""
    data = open(trained, "rb").read()
    archive = zipfile.ZipFile(trained)
    weights = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda i: i.file_size)
    start = weights.header_offset + 30 + len(weights.filename.encode()) + len(weights.extra)
    (tmp_path / "flipped.pth").write_bytes(flip_bytes(data, start + int(weights.file_size * where)))
    flipped, original = (torch.load(path, weights_only=True)["model"] for path in (tmp_path / "flipped.pth", trained))
    assert any(not torch.equal(flipped[name], original[name]) for name in original)  # torch.load saw nothing wrong
    with pytest.raises(SystemExit) as error:
        generate(**options(demo, tmp_path, img=os.path.join(demo.img_path, "val_0001.jpg"),
                           model_ckpt=str(tmp_path / "flipped.pth")))
    one_line_error(error, "flipped.pth", "the file is damaged")


def test_a_checkpoint_whose_end_token_moved_is_refused_as_damaged(demo, trained, tmp_path):
    checkpoint = torch.load(trained, weights_only=True)
    end = checkpoint["ix2word"].index("</EOS>")
    words = checkpoint["ix2word"]
    words[end], words[end + 5] = words[end + 5], words[end]  # </EOS> now at another word's index
    torch.save(checkpoint, tmp_path / "moved.pth")
    with pytest.raises(SystemExit) as error:
        generate(**options(demo, tmp_path, img=os.path.join(demo.img_path, "val_0001.jpg"),
                           model_ckpt=str(tmp_path / "moved.pth")))
    one_line_error(error, "moved.pth", "the file is damaged")


def test_resume_from_a_checkpoint_whose_config_is_not_a_dict_is_one_line(demo, tmp_path):
    train(**options(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss"))
    last = tmp_path / "checkpoints" / "last.pth"
    checkpoint = torch.load(last, weights_only=True)
    torch.save({**checkpoint, "config": "oops"}, last)
    with pytest.raises(SystemExit) as error:
        train(**options(demo, tmp_path, epoch=2, eval_size=0, metric="val_loss", resume=True))
    one_line_error(error, "last.pth", "config")


def test_a_beam_wider_than_the_vocabulary_is_refused_before_training(demo, tmp_path):
    with pytest.raises(SystemExit) as error:
        train(**options(demo, tmp_path, beam_size=1000))
    one_line_error(error, "--beam-size=1000")
    assert not (tmp_path / "checkpoints" / "last.pth").exists()


def test_fine_tuning_beyond_the_backbones_stages_is_refused_before_training(demo, tmp_path):
    with pytest.raises(SystemExit) as error:
        train(**options(demo, tmp_path, finetune_encoder=8))
    one_line_error(error, "--finetune-encoder=8", "mobilenet_v2 has 7 stages")
    assert not (tmp_path / "checkpoints" / "last.pth").exists()


# --- 7. outputs checked before work; inputs and finished runs never written over ---
def test_outputs_that_cannot_be_written_are_refused_before_work(demo, trained, tmp_path, capsys):
    image = os.path.join(demo.img_path, "val_0001.jpg")
    for output in (str(tmp_path), str(tmp_path / "missing" / "r.json")):
        with pytest.raises(SystemExit) as error:
            generate(**options(demo, tmp_path, img=image, model_ckpt=trained, output=output))
        one_line_error(error, output)
        assert capsys.readouterr().out == ""  # refused before any caption
    with pytest.raises(SystemExit) as error:
        evaluate(**options(demo, tmp_path, model_ckpt=trained, metrics_path=str(tmp_path)))
    one_line_error(error, tmp_path, "is a folder")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as error:
        train(**options(demo, tmp_path, log_dir=str(tmp_path / "afile")))
    one_line_error(error, "afile", "--log-dir must be a folder")
    with pytest.raises(SystemExit) as error:
        train(**options(demo, tmp_path, env="../../x"))
    one_line_error(error, "--env=../../x")


def test_preprocessing_never_writes_over_its_annotation_file(demo, tmp_path):
    annotations = tmp_path / "a.json"
    shutil.copy(os.path.join(os.path.dirname(demo.caption_data_path), "val.json"), annotations)
    before = annotations.read_bytes()
    with pytest.raises(SystemExit) as error:
        process(annotation_file=str(annotations), caption_data_path=str(annotations))
    one_line_error(error, "a.json", "is also an input")
    assert annotations.read_bytes() == before


def test_a_finished_run_is_kept_unless_asked_to_overwrite(demo, tmp_path):
    train(**options(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss"))
    before = digests(tmp_path / "checkpoints")
    with pytest.raises(SystemExit) as error:
        train(**options(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss"))
    one_line_error(error, "holds a run", "--resume", "--overwrite")
    assert digests(tmp_path / "checkpoints") == before
    train(**options(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss", overwrite=True, seed=1))
    assert load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))["config"]["seed"] == 1


# --- 8. odd image ids ---
@pytest.mark.parametrize("image_id", ["a\udc80.jpg", "a\tb.jpg", "a\nb.jpg"])
def test_image_ids_with_control_characters_or_lone_surrogates_are_refused(tmp_path, image_id):
    (tmp_path / "a.json").write_text(json.dumps([{"image_id": image_id, "caption": ["一个人"]}]))
    with pytest.raises(SystemExit) as error:
        process(annotation_file=str(tmp_path / "a.json"), caption_data_path=str(tmp_path / "c.pth"))
    one_line_error(error, "entry 0", "control character or is not valid Unicode")


# --- 9. replay without a server ---
def test_replay_without_a_server_is_one_line(tmp_path):
    (tmp_path / "run.visdom.log").write_text('["events", {"eid": "caption"}]\n')
    with pytest.raises(SystemExit) as error:
        replay(log=str(tmp_path / "run.visdom.log"), vis_port=1)
    one_line_error(error, "no Visdom server answers", "visdom_server.py start")


# --- 11. the review's findings ---
def test_random_weights_are_the_same_every_time(tmp_path):
    first, second = (images.build_backbone("mobilenet_v2", "none") for _ in range(2))
    torch.testing.assert_close(first.state_dict(), second.state_dict(), rtol=0, atol=0)


def test_near_zero_features_are_warned_about(demo, tmp_path, capsys):
    caption = str(tmp_path / "caption.pth")
    shutil.copy(demo.val_caption_data_path, caption)
    extract(caption_data_path=caption, img_path=demo.img_path, backbone="mobilenet_v2", weights="none",
            num_workers=0)
    assert "warning: every feature is (nearly) zero" in capsys.readouterr().err


def test_a_changed_traced_backbone_is_never_used(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.manual_seed(3)
    torch.save(images.BACKBONES["mobilenet_v2"].build().state_dict(), tmp_path / "w.pth")
    weights = str(tmp_path / "w.pth")
    image = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        expected = images.load_backbone("mobilenet_v2", weights)(image)
        traced = images.traced_path("mobilenet_v2", weights)
        planted = torch.jit.trace(torch.nn.Sequential(torch.nn.Conv2d(3, 1280, 32, 32)), image)
        torch.jit.save(planted, traced)  # another module where the traced trunk was
        torch.testing.assert_close(images.load_backbone("mobilenet_v2", weights)(image), expected)
        torch.manual_seed(4)
        torch.save(images.BACKBONES["mobilenet_v2"].build().state_dict(), weights)  # the weights change
        changed = images.load_backbone("mobilenet_v2", weights)(image)
        torch.testing.assert_close(changed, images.build_backbone("mobilenet_v2", weights)(image))
        assert (changed - expected).abs().max() > 0.1 * expected.abs().max()  # not the stale trace


def test_attention_maps_are_drawn_over_what_the_model_saw(tmp_path):
    photo = Image.new("RGB", (600, 200), (255, 0, 0))
    photo.paste((0, 0, 255), (200, 0, 400, 200))  # red | blue | red: the model sees the blue centre
    photo.save(tmp_path / "wide.png")
    seen = np.asarray(images.seen_photo(str(tmp_path / "wide.png")), dtype=np.int32)
    inside = seen[:, 2:-2]  # the edge columns blend with the red beside the centre
    assert seen.shape == (224, 224, 3) and (inside[..., 2] > 250).all() and (inside[..., 0] < 5).all()


def test_scheduled_sampling_samples_in_a_one_epoch_run(demo, tmp_path):
    train(**options(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss", scheduled_sampling=0.25))
    log = [json.loads(line) for line in open(tmp_path / "logs" / "caption.metrics.jsonl")]
    assert [r["value"] for r in log if r["name"] == "scheduled_sampling"] == [0.25]


@pytest.mark.parametrize("schedule", [{}, {"warmup_steps": 7, "label_smoothing": 0.1}])
def test_an_interrupted_run_with_dropout_resumes_as_if_never_stopped(demo, tmp_path, schedule):
    """Bit for bit, with the warm-up of the lr (its step count and base lr saved) and label smoothing too."""
    common = {"eval_size": 0, "metric": "val_loss", "dropout": 0.5, **schedule}
    train(**options(demo, tmp_path / "straight", epoch=2, **common))
    train(**options(demo, tmp_path / "resumed", epoch=1, **common))
    train(**options(demo, tmp_path / "resumed", epoch=2, resume=True, **common))
    straight, resumed = (load_checkpoint(str(tmp_path / run / "checkpoints" / "last.pth"))["model"]
                         for run in ("straight", "resumed"))
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)


def test_evaluate_never_writes_its_output_over_a_photo(demo, trained, tmp_path):
    (tmp_path / "images").mkdir()
    shutil.copy(os.path.join(demo.img_path, "val_0001.jpg"), tmp_path / "images" / "val_0001.jpg")
    photo = tmp_path / "images" / "val_0001.jpg"
    before = photo.read_bytes()
    references = tmp_path / "val.json"
    references.write_text(json.dumps([{"image_id": "val_0001.jpg", "caption": ["一个红色的圆"]}]), encoding="utf-8")
    with pytest.raises(SystemExit, match="val_0001.jpg: is also an input of this command"):
        evaluate(**options(demo, tmp_path, annotation_file=str(references), img_path=str(tmp_path / "images"),
                           model_ckpt=trained, output=str(photo)))
    assert photo.read_bytes() == before


@pytest.mark.parametrize("content, kind", [(b'{"model": 1}', "JSON"), (b"\xff\xd8\xff\xe0 photo", "a JPEG image"),
                                           (bytes(range(7, 200)), "not a PyTorch file"), (b"", "an empty file")])
def test_a_file_that_is_no_checkpoint_is_named_for_what_it_is(demo, tmp_path, content, kind):
    (tmp_path / "model.pth").write_bytes(content)
    with pytest.raises(SystemExit) as error:
        generate(**options(demo, img=os.path.join(demo.img_path, "val_0001.jpg"),
                           model_ckpt=str(tmp_path / "model.pth")))
    one_line_error(error, "model.pth: not a readable checkpoint", f"{kind}, not a file this toolkit wrote")


def test_a_damaged_training_caption_file_for_evaluate_is_one_line_before_captioning(demo, trained, tmp_path, capsys):
    (tmp_path / "train.pth").write_bytes(b"PK\x03\x04 half written")
    with pytest.raises(SystemExit) as error:
        evaluate(**options(demo, tmp_path, model_ckpt=trained, caption_data_path=str(tmp_path / "train.pth")))
    one_line_error(error, "train.pth: not a readable caption data file")
    assert "images scored" not in capsys.readouterr().out
