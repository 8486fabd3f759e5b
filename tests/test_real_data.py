"""Real photos and native-speaker captions (Flickr8k-CN in ../shared) over real ImageNet features."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from conftest import SHARED, mobilenet_weights

from beam_search import caption_features
from captions import tokenize
from config import Config
from data_preprocess import process
from feature_extract import extract
from main import train
from model import load_checkpoint, model_from_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"{SHARED} is absent (real Flickr8k-CN data)"),
    pytest.mark.skipif(mobilenet_weights() == "none", reason="MobileNetV2 ImageNet weights not installed (install.sh)"),
]
FUNCTION_WORDS = {"一个", "在", "的", "着", "上", "和"}


def test_captions_of_training_photos_share_words_with_their_references(tmp_path):
    with open(os.path.join(SHARED, "annotations", "flickr8kcn_train_zhc.json"), encoding="utf-8") as file:
        entries = json.load(file)[:300]
    (tmp_path / "train.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    opt = Config(annotation_file=str(tmp_path / "train.json"), caption_data_path=str(tmp_path / "c.pth"),
                 img_path=os.path.join(SHARED, "images"), backbone="mobilenet_v2", num_workers=0,
                 checkpoint_dir=str(tmp_path / "ck"), log_dir=str(tmp_path / "logs"), vis_port=1,
                 val_fraction=0.1, eval_size=0, metric="val_loss", epoch=15, scst_epoch=0, lr=3e-3,
                 plot_every=1000, batch_size=64)
    options = dataclasses.asdict(opt)
    process(**options)
    extract(**options)
    train(**options)

    checkpoint = load_checkpoint(str(tmp_path / "ck" / "last.pth"))
    model = model_from_checkpoint(checkpoint, "last.pth")
    features = torch.from_numpy(np.load(str(tmp_path / "c.features.npy"))[:40].astype("float32"))
    captions = caption_features(model, features, checkpoint["ix2word"], opt)
    words = [{w for sentence in entry["caption"] for w in tokenize(sentence)} - FUNCTION_WORDS for entry in entries]
    own = sum(bool(set(tokenize(beams[0][0])) & words[i]) for i, beams in enumerate(captions))
    # the same captions against the references of other photos: what a caption ignoring the image would get
    other = sum(bool(set(tokenize(beams[0][0])) & words[(i + 7) % 40]) for i, beams in enumerate(captions))
    assert own >= 20 and own > other + 5, f"{own} of 40 share a word with their own references, {other} with others"
