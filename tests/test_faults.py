"""Bad inputs and faults, each produced for real: missing and corrupt images, mismatched
features, kill -9 during a checkpoint write, a full disk, an unwritable checkpoint folder."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, command_line, options

from data_preprocess import process
from images import features_path
from main import evaluate, generate, train
from model import load_checkpoint


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """A checkpoint trained for one epoch on the demo data."""
    folder = tmp_path_factory.mktemp("trained")
    train(**options(demo, folder, epoch=1, eval_size=0, metric="val_loss"))
    return str(folder / "checkpoints" / "last.pth")


def test_generate_reports_bad_files_and_captions_the_rest(demo, trained, tmp_path, capsys):
    shutil.copy(os.path.join(demo.img_path, "val_0001.jpg"), tmp_path / "good.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    generate(**options(demo, tmp_path, img=str(tmp_path), model_ckpt=trained))
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{tmp_path / 'good.jpg'}\t")
    assert f"error: {tmp_path / 'corrupt.jpg'}: " in captured.err
    with pytest.raises(SystemExit):
        generate(**options(demo, tmp_path, img=str(tmp_path / "missing.jpg"), model_ckpt=trained))
    assert f"error: {tmp_path / 'missing.jpg'}: FileNotFoundError" in capsys.readouterr().err


def copy_caption_data(demo, tmp_path, name):
    target = str(tmp_path / f"{name}.pth")
    shutil.copy(demo.caption_data_path, target)
    return target


def test_features_that_do_not_match_the_captions_stop_training_early(demo, tmp_path):
    wrong_rows = copy_caption_data(demo, tmp_path, "rows")
    for suffix in (".npy", ".json"):  # the 30 validation features beside the 120 training captions
        shutil.copy(features_path(demo.val_caption_data_path).replace(".npy", suffix),
                    features_path(wrong_rows).replace(".npy", suffix))
    with pytest.raises(SystemExit, match="holds 30x1280 features but .*rows.pth has 120 images"):
        train(**options(demo, tmp_path, caption_data_path=wrong_rows))

    wrong_dim = copy_caption_data(demo, tmp_path, "dim")
    np.save(features_path(wrong_dim), np.zeros((120, 512), dtype=np.float16))
    shutil.copy(features_path(demo.caption_data_path).replace(".npy", ".json"),
                features_path(wrong_dim).replace(".npy", ".json"))
    with pytest.raises(SystemExit, match="holds 120x512 features"):
        train(**options(demo, tmp_path, caption_data_path=wrong_dim))

    other_backbone = copy_caption_data(demo, tmp_path, "backbone")
    shutil.copy(features_path(demo.caption_data_path), features_path(other_backbone))
    meta = json.load(open(features_path(demo.caption_data_path).replace(".npy", ".json")))
    json.dump({**meta, "backbone": "resnet50"}, open(features_path(other_backbone).replace(".npy", ".json"), "w"))
    with pytest.raises(SystemExit, match="features from .* training features from resnet50"):
        train(**options(demo, tmp_path, caption_data_path=other_backbone))

    missing = copy_caption_data(demo, tmp_path, "nofeatures")
    with pytest.raises(SystemExit, match="no features for .*run `python feature_extract.py extract"):
        train(**options(demo, tmp_path, caption_data_path=missing))


WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from files import atomic_save
big = torch.randn(4_000_000)
n = 0
while True:
    n += 1
    atomic_save({{"model": big, "n": n}}, {path!r})
    print(n, flush=True)
"""


def test_kill_9_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    path = str(tmp_path / "last.pth")
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(root=ROOT, path=path)],
                              stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # let a few complete writes happen, then kill in the middle of the next ones
        writer.stdout.readline()
    time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["n"] >= 3 and checkpoint["model"].shape == (4_000_000,)


def limit_file_size():
    """In the child: files may not grow past 200 kB, as on a full disk (EFBIG instead of a signal)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


@pytest.mark.slow
def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(demo, tmp_path):
    train(**options(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss"))
    last = tmp_path / "checkpoints" / "last.pth"
    before = last.read_bytes()
    args = command_line(options(demo, tmp_path, epoch=2, eval_size=0, metric="val_loss", resume=True))
    run = subprocess.run([sys.executable, "main.py", "train", *args], cwd=ROOT, capture_output=True, text=True,
                         preexec_fn=limit_file_size, timeout=300)
    assert run.returncode == 1
    assert f"error: cannot write {tmp_path / 'checkpoints'}" in run.stderr and "the previous file is kept" in run.stderr
    assert "File too large" in run.stderr  # the OS's own reason (EFBIG here), not a guess
    assert last.read_bytes() == before
    assert load_checkpoint(str(last))["state"]["epoch"] == 1


def test_a_failed_write_gives_the_os_reason_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "big.pth"
    script = (f"import sys; sys.path.insert(0, {ROOT!r}); import torch; from files import atomic_save; "
              f"atomic_save({{'n': 1}}, {str(path)!r}); atomic_save(torch.zeros(100_000), {str(path)!r})")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, preexec_fn=limit_file_size)
    assert f"UserError: cannot write {path}: File too large; the previous file is kept" in run.stderr
    assert torch.load(path, weights_only=True) == {"n": 1} and os.listdir(tmp_path) == ["big.pth"]


def test_unwritable_checkpoint_folder_is_a_clear_error(demo, tmp_path):
    blocker = tmp_path / "checkpoints"
    blocker.write_text("a file where the checkpoint folder should be")
    with pytest.raises(SystemExit, match=f"{blocker}: is a file, but the --checkpoint-dir must be a folder"):
        train(**options(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss"))


def test_features_of_a_reordered_caption_file_are_refused(demo, tmp_path):
    """The same images, encoded again in another order: every features row would belong to another image."""
    entries = json.load(open(os.path.join(os.path.dirname(demo.caption_data_path), "train.json")))
    (tmp_path / "reordered.json").write_text(json.dumps(entries[::-1], ensure_ascii=False), encoding="utf-8")
    reordered = copy_caption_data(demo, tmp_path, "reordered")
    for suffix in (".npy", ".json"):
        shutil.copy(features_path(demo.caption_data_path).replace(".npy", suffix),
                    features_path(reordered).replace(".npy", suffix))
    process(annotation_file=str(tmp_path / "reordered.json"), caption_data_path=reordered, vocab_from=reordered)
    with pytest.raises(SystemExit, match="reordered.features.npy: extracted for another image list or order"):
        train(**options(demo, tmp_path, caption_data_path=reordered))


def test_evaluate_says_what_it_skipped_and_writes_only_what_it_is_asked_to(demo, trained, tmp_path, monkeypatch,
                                                                           capsys):
    images = tmp_path / "images"
    shutil.copytree(demo.img_path, images)
    os.remove(images / "val_0003.jpg")
    monkeypatch.chdir(tmp_path)
    evaluate(**options(demo, tmp_path, img_path=str(images), model_ckpt=trained))
    captured = capsys.readouterr()
    assert "warning: 1 of 30 images could not be read and are not scored" in captured.err
    assert captured.out.startswith("29 images scored against")
    assert sorted(os.listdir(tmp_path)) == ["images"]  # no results.json or metrics.json left in the working folder


def test_a_checkpoint_from_another_version_still_captions(demo, trained, tmp_path, capsys):
    checkpoint = torch.load(trained, weights_only=True)
    del checkpoint["config"]["length_norm"]
    checkpoint["config"]["retired_option"] = 1
    del checkpoint["checksum"], checkpoint["unfinished"]  # which an older version did not write
    torch.save(checkpoint, tmp_path / "old.pth")
    generate(**options(demo, tmp_path, img=os.path.join(demo.img_path, "val_0001.jpg"),
                       model_ckpt=str(tmp_path / "old.pth")))
    captured = capsys.readouterr()
    assert "dropped unknown --retired_option; --length_norm takes its default" in captured.err
    assert captured.out.startswith(os.path.join(demo.img_path, "val_0001.jpg") + "\t")
