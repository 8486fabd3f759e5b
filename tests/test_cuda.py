"""Every CUDA path, for the first GPU at hand (`bash cuda_check.sh run` runs these and the bench there):
extraction against the CPU's features, training steps under bfloat16 and float16 autocast with a
resume, fine-tuning, torchrun with NCCL, and generate against the CPU's captions. Without a GPU each
test is skipped, saying so."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, command_line, options

from captioning import caption_images
from feature_extract import extract
from images import features_path
from main import list_images, train
from model import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA checks did not run")
# Photos for generate: real ones where cuda_check.sh prepared them, else the demo's.
PHOTOS = os.path.join(ROOT, ".gpu", "photos")


def copy_captions(demo, folder, name):
    target = str(folder / f"{name}.pth")
    shutil.copy(demo.caption_data_path, target)
    return target


def test_cuda_extraction_gives_the_cpu_features(demo, tmp_path):
    features = {}
    for device, use_gpu in (("cpu", False), ("cuda", True)):
        caption = copy_captions(demo, tmp_path, device)
        extract(caption_data_path=caption, img_path=demo.img_path, backbone="mobilenet_v2", grid=7,
                use_gpu=use_gpu, num_workers=2)
        features[device] = [np.load(features_path(caption, grid)).astype(np.float32) for grid in (False, True)]
    for cpu, cuda in zip(features["cpu"], features["cuda"]):
        cpu, cuda = cpu.reshape(len(cpu), -1), cuda.reshape(len(cuda), -1)
        cosine = (cpu * cuda).sum(1) / (np.linalg.norm(cpu, axis=1) * np.linalg.norm(cuda, axis=1))
        print(f"CPU/CUDA feature cosine: min {cosine.min():.5f}, mean {cosine.mean():.5f}")
        assert cosine.min() >= 0.999


@pytest.mark.parametrize("model", ["pooled", "attention"])
@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_training_steps_under_autocast_then_resume(demo, tmp_path, monkeypatch, model, half):
    if half == "float16":  # the GradScaler's path, as on GPUs without bfloat16
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    run = {"model": model, "eval_size": 8, "use_gpu": True}
    train(**options(demo, tmp_path, epoch=1, scst_epoch=0, **run))
    train(**options(demo, tmp_path, epoch=2, scst_epoch=1, resume=True, **run))  # on into self-critical
    last = load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))
    assert (last["state"]["epoch"], last["state"]["phase"]) == (3, "self-critical")
    assert bool(last["scaler"]) == (half == "float16")  # the scaler's state travels with the run
    assert all(bool(torch.isfinite(w).all()) for w in last["model"].values())


def test_fine_tuning_steps_on_cuda(demo, tmp_path):
    train(**options(demo, tmp_path, epoch=1, finetune_encoder=1, finetune_epoch=1, eval_size=8, use_gpu=True))
    last = load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))
    assert last["state"]["phase"] == "fine-tuning" and "encoder" in last


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="one GPU: NCCL needs a process on each of two GPUs")
def test_torchrun_with_nccl_trains_one_process_per_gpu(demo, tmp_path):
    processes = torch.cuda.device_count()
    args = [a for a in command_line(options(demo, tmp_path, epoch=1, eval_size=8, use_gpu=True))
            if not a.endswith("=")]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    result = subprocess.run([*launch, "main.py", "train", *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(str(tmp_path / "checkpoints" / "last.pth"))["state"]["processes"] == processes


def test_generate_on_cuda_gives_the_cpu_captions(demo, tmp_path):
    train(**options(demo, tmp_path, epoch=2, eval_size=8, use_gpu=True))
    paths = list_images(PHOTOS if os.path.isdir(PHOTOS) else demo.img_path)[:64]
    captions = {}
    for use_gpu in (False, True):
        opt = demo.__class__(**options(demo, tmp_path, use_gpu=use_gpu, model_ckpt="", num_workers=2))
        found, errors = caption_images(paths, opt)
        assert not errors
        captions[use_gpu] = {path: beams[0][0] for path, beams in found.items()}
    differ = [path for path in paths if captions[True][path] != captions[False][path]]
    print(f"generate: {len(paths) - len(differ)} of {len(paths)} captions the same on CUDA as on the CPU; "
          f"differing (float rounding of features near a tie): {differ[:5]}")
    assert len(differ) <= len(paths) // 10
