"""Crash consistency: training and extraction killed with SIGKILL (the out-of-memory killer, a batch
scheduler's hard limit, a power cut) at each point where they write a file, before and after each
rename, then run again. The next command always goes on (a resume, or a fresh start where nothing was
kept), every file on disk loads, no temporary file stays, and the outputs equal an uninterrupted run's.
CRASH_LONG=1 adds kills at random moments (minutes)."""
import filecmp
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, command_line, options

from model import load_checkpoint

KILLED_AT = os.path.join(ROOT, "tests", "killed_at.py")
pytestmark = pytest.mark.slow


def run(point, script, *arguments):
    """The command, killed at rename point `point` (-1: never) -> (exit status, renames made or None)."""
    done = subprocess.run([sys.executable, KILLED_AT, str(point), script, *arguments], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    renames = re.search(r"renames: (\d+)", done.stderr)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr[-2000:]
    return done.returncode, int(renames.group(1)) if renames else None


def training_arguments(demo, folder, **changes):
    return command_line(options(demo, folder, epoch=2, eval_size=0, metric="val_loss", lr_patience=0,
                                early_stop_patience=0, num_workers=0, **changes))


def going_on(arguments, folder):
    """The command that goes on after a kill: --resume when the run kept a checkpoint, else the same one."""
    kept = any(os.path.exists(folder / "checkpoints" / name) for name in ("last.pth", "best.pth"))
    return [*arguments, *(["--resume=true"] if kept else [])]


def weights(path):
    """The weights a checkpoint captions with, and with --ema-decay those it learns with too."""
    checkpoint = load_checkpoint(str(path))
    return {**checkpoint["model"], **{f"training {k}": v for k, v in checkpoint.get("training_model", {}).items()}}


def check_training_folder(folder):
    """Every checkpoint on disk loads, and no temporary file of a killed save is left."""
    names = os.listdir(folder)
    assert not [name for name in names if name.startswith(".tmp-")], names
    for name in names:
        load_checkpoint(str(folder / name))


@pytest.mark.parametrize("changes", [{}, {"ema_decay": 0.9}])
def test_training_killed_at_any_rename_goes_on_to_the_same_weights(demo, tmp_path, changes):
    """With --ema-decay the checkpoints hold the moving average and the learning weights: both go on."""
    reference = tmp_path / "reference"
    status, renames = run(-1, "main.py", "train", *training_arguments(demo, reference, **changes))
    assert status == 0 and renames >= 4  # last.pth and best.pth, twice
    assert ("training classifier.weight" in weights(reference / "checkpoints" / "last.pth")) == bool(changes)
    for point in range(2 * renames):
        folder = tmp_path / f"killed-{point}"
        arguments = training_arguments(demo, folder, **changes)
        assert run(point, "main.py", "train", *arguments)[0] == -signal.SIGKILL
        assert run(-1, "main.py", "train", *going_on(arguments, folder))[0] == 0, point
        check_training_folder(folder / "checkpoints")
        for name in ("last.pth", "best.pth"):
            mine, theirs = weights(folder / "checkpoints" / name), weights(reference / "checkpoints" / name)
            assert all(torch.equal(mine[key], theirs[key]) for key in theirs), (point, name)
        shutil.rmtree(folder)


def extraction_arguments(demo, caption_data_path):
    return [f"--caption-data-path={caption_data_path}", f"--img-path={demo.img_path}", "--backbone=mobilenet_v2",
            "--grid=7", "--batch-size=30", "--num-workers=0"]


def copy_captions(demo, folder):
    folder.mkdir()
    shutil.copy(demo.val_caption_data_path, folder / "caption.pth")
    return str(folder / "caption.pth")


def test_extraction_killed_at_any_rename_goes_on_to_the_same_features(demo, tmp_path):
    reference = copy_captions(demo, tmp_path / "reference")
    status, renames = run(-1, "feature_extract.py", "extract", *extraction_arguments(demo, reference))
    assert status == 0 and renames >= 5  # a progress record, .bad.tsv, 2 arrays, the description
    expected = sorted(os.listdir(tmp_path / "reference"))
    for point in range(2 * renames):
        folder = tmp_path / f"killed-{point}"
        caption_data_path = copy_captions(demo, folder)
        arguments = extraction_arguments(demo, caption_data_path)
        assert run(point, "feature_extract.py", "extract", *arguments)[0] == -signal.SIGKILL
        assert run(-1, "feature_extract.py", "extract", *arguments)[0] == 0, point
        assert sorted(os.listdir(folder)) == expected, point  # the .bad.tsv too; no record or .partial left
        for name in expected:
            if name.endswith(".npy"):
                assert np.array_equal(np.load(folder / name), np.load(tmp_path / "reference" / name)), (point, name)
            elif name.endswith(".tsv"):
                assert filecmp.cmp(folder / name, tmp_path / "reference" / name, shallow=False), (point, name)
        shutil.rmtree(folder)


@pytest.mark.skipif(not os.environ.get("CRASH_LONG"), reason="the long crash profile runs with CRASH_LONG=1")
@pytest.mark.parametrize("seed", range(5))
def test_training_killed_at_random_moments_goes_on_to_the_same_weights(demo, tmp_path, seed):
    reference = tmp_path / "reference"
    assert run(-1, "main.py", "train", *training_arguments(demo, reference))[0] == 0
    folder, delays = tmp_path / "killed", random.Random(seed)
    arguments = training_arguments(demo, folder)
    for _ in range(3):
        process = subprocess.Popen([sys.executable, "main.py", "train", *going_on(arguments, folder)], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delays.uniform(4, 15))
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert run(-1, "main.py", "train", *going_on(arguments, folder))[0] == 0
    check_training_folder(folder / "checkpoints")
    mine, theirs = weights(folder / "checkpoints" / "last.pth"), weights(reference / "checkpoints" / "last.pth")
    assert all(torch.equal(mine[key], theirs[key]) for key in theirs)
