"""Several processes under torchrun (gloo on 127.0.0.1): they give what one process gives."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, command_line, mobilenet_weights, options

from captions import load_caption_data
from images import features_path
from model import checksum, load_checkpoint, model_from_checkpoint

pytestmark = pytest.mark.slow


def torchrun(processes, *command, **environment):
    """Run a command file under torchrun on this machine; its output if it fails."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    result = subprocess.run([*launch, *command], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **environment})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_extract_the_same_features_as_one(demo, tmp_path):
    arrays = {}
    for processes in (1, 2):
        caption_path = str(tmp_path / f"{processes}" / "caption.pth")
        os.makedirs(os.path.dirname(caption_path))
        shutil.copy(demo.caption_data_path, caption_path)
        torchrun(processes, "feature_extract.py", "extract", f"--caption-data-path={caption_path}",
                 f"--img-path={demo.img_path}", "--backbone=mobilenet_v2", f"--weights={mobilenet_weights()}",
                 "--grid=7", "--batch-size=16", "--num-workers=0")
        arrays[processes] = [np.load(features_path(caption_path, grid)) for grid in (False, True)]
        assert sorted(os.listdir(os.path.dirname(caption_path))) == [
            "caption.features.bad.tsv", "caption.features.json", "caption.features.npy", "caption.pth",
            "caption.regions.npy"]  # no partial files left
    for one, two in zip(arrays[1], arrays[2]):
        assert one.shape[0] == 120 and one.any()
        np.testing.assert_array_equal(two, one)


def train_args(opt, folder, **changes):
    """Options of `main.py train`; the empty ones are left out (torchrun refuses `--log=` as an
    ambiguous abbreviation of its own options)."""
    return [arg for arg in command_line(options(opt, folder, **changes)) if not arg.endswith("=")]


def validation_losses(folder):
    log = [json.loads(line) for line in open(folder / "logs" / "caption.metrics.jsonl")]
    return [record["value"] for record in log if record["name"] == "val_loss"]


@pytest.mark.parametrize("model", ["pooled", "transformer"])
def test_two_processes_train_like_one_with_the_same_global_batch(demo, tmp_path, model):
    """--batch-size is the batch of the whole run: 2 processes x 16 captions take the steps that one
    process takes with 32, and reach about the same loss; validation is shared out and gathered. The
    transformer's batches are whole images with all their captions (about 32 captions: 6 images)."""
    states, sizes = {}, {"d_model": 32, "heads": 4, "lr": 3e-3} if model == "transformer" else {}
    for processes in (1, 2):
        folder = tmp_path / str(processes)
        torchrun(processes, "main.py", "train", *train_args(demo, folder, epoch=2, eval_size=12, model=model,
                                                            **sizes))
        model_from_checkpoint(load_checkpoint(str(folder / "checkpoints" / "best.pth")), "best.pth")  # as generate
        states[processes] = load_checkpoint(str(folder / "checkpoints" / "last.pth"))["state"]
        assert len(validation_losses(folder)) == 2
    batches = 120 // round(demo.batch_size / 5) if model == "transformer" else 120 * 5 // demo.batch_size + 1
    assert states[2]["step"] == states[1]["step"] == 2 * batches
    assert states[2]["processes"] == 2
    one, two = validation_losses(tmp_path / "1"), validation_losses(tmp_path / "2")
    assert one[1] < 0.8 * one[0] and two[1] < 0.8 * two[0]  # both learn
    # different dropout draws, per-process loss means (more apart at the transformer's higher lr)
    np.testing.assert_allclose(two, one, rtol=0.1 if model == "transformer" else 0.05)


def test_sigterm_to_one_process_then_resume_sees_every_caption_once(demo, tmp_path):
    record = str(tmp_path / "batches")
    args = train_args(demo, tmp_path, epoch=1, eval_size=0, metric="val_loss", batch_size=16)
    stopped = torchrun(2, "tests/recorded_main.py", "train", *args, RECORD_BATCHES=record, STOP_PROCESS="1",
                       STOP_AFTER="5")
    assert "SIGTERM: saved" in stopped.stdout or "stopped by another process" in stopped.stdout
    saved = load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))["state"]
    assert (saved["epoch"], saved["batch"], saved["processes"]) == (0, 5, 2)

    resumed = torchrun(2, "tests/recorded_main.py", "train", *args, "--resume=True", RECORD_BATCHES=record)
    assert "at epoch 0, batch 5" in resumed.stdout
    assert load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))["state"]["epoch"] == 1
    seen = [int(number) for process in (0, 1) for line in open(f"{record}.{process}") for number in line.split()]
    captions = sum(len(caption) for caption in load_caption_data(demo.caption_data_path)["caption"])
    assert sorted(seen) == list(range(captions))  # every caption once, none twice, none left out


def test_self_critical_steps_whose_samples_all_end_at_once_train_under_two_processes(demo, tmp_path):
    """Samples that all end at the first word never embed a word: DistributedDataParallel must not
    wait for the embedding's gradient (it would fail at the next step)."""
    common = {"epoch": 1, "eval_size": 0, "metric": "val_loss", "scst_samples": 2}
    torchrun(2, "main.py", "train", *train_args(demo, tmp_path, **common))
    for name in ("best.pth", "last.pth"):
        path = tmp_path / "checkpoints" / name
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["model"]["classifier.bias"][checkpoint["ix2word"].index("</EOS>")] += 100.0
        checkpoint["checksum"] = checksum(checkpoint)
        torch.save(checkpoint, path)
    torchrun(2, "main.py", "train", *train_args(demo, tmp_path, **common, scst_epoch=1, resume=True))
    state = load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))["state"]
    assert state["phase"] == "self-critical" and state["phase_epoch"] == 1
