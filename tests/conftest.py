"""Shared fixtures and helpers: a small demo dataset taken through preprocessing and feature extraction,
and the options of a run as the commands take them."""
import dataclasses
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import demo_data  # noqa: E402
from config import Config  # noqa: E402
from data_preprocess import process  # noqa: E402
from feature_extract import extract  # noqa: E402
from images import weights_path  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data", "flickr8k-cn")


def mobilenet_weights():
    """'default': torchvision's MobileNetV2 ImageNet file, which install.sh installs. Without it the
    tests that need it fail, saying so: random weights give near-zero features that hide bugs."""
    path = weights_path("mobilenet_v2", "IMAGENET1K_V1")
    if not os.path.isfile(path):
        pytest.fail(f"{path}: no MobileNetV2 ImageNet weights; run `bash install.sh` first")
    return "default"


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """Config of a 120 + 30 image demo set with captions encoded and features extracted (pooled and 7x7 regions)."""
    folder = tmp_path_factory.mktemp("demo")
    demo_data.make(out=str(folder), num_train=120, num_val=30)
    train, val = str(folder / "caption.pth"), str(folder / "caption_val.pth")
    process(annotation_file=str(folder / "train.json"), caption_data_path=train, min_appear=1)
    process(annotation_file=str(folder / "val.json"), caption_data_path=val, vocab_from=train)
    for path in (train, val):
        extract(caption_data_path=path, img_path=str(folder / "images"), backbone="mobilenet_v2",
                weights=mobilenet_weights(), num_workers=0, grid=7)
    return Config(caption_data_path=train, val_caption_data_path=val, img_path=str(folder / "images"),
                  checkpoint_dir=str(folder / "checkpoints"), log_dir=str(folder / "logs"),
                  annotation_file=str(folder / "val.json"), vis_port=1, vis_timeout=0.2,
                  embedding_dim=64, hidden_size=128, num_layers=1, batch_size=32, eval_size=30, plot_every=5,
                  scst_epoch=0)


def options(opt, folder=None, **changes):
    """The keyword options of a command for `opt` with `changes`; checkpoints and logs under `folder`."""
    if folder is not None:
        changes = {"checkpoint_dir": str(folder / "checkpoints"), "log_dir": str(folder / "logs"), **changes}
    return dataclasses.asdict(dataclasses.replace(opt, **changes))


def command_line(keyword_options):
    """Keyword options -> `--name=value` arguments for a command run in a subprocess."""
    return [f"--{name}={value}" for name, value in keyword_options.items()]
