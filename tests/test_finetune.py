"""--finetune-encoder: the chosen stages learn and nothing else; the checkpoint captions with its own encoder."""
import os

import numpy as np
import pytest
import torch
from conftest import mobilenet_weights, options

from beam_search import caption_features
from captioning import caption_images
from captions import Habits
from config import UserError
from dataset import CaptionSplit
from encoder import Encoder, TrainingImages
from images import build_backbone, encode_images
from main import train
from model import load_checkpoint, model_from_checkpoint

pretrained = pytest.mark.skipif(mobilenet_weights() == "none", reason="needs the MobileNetV2 weights of install.sh")


@pytest.fixture(scope="module")
def finetuned(demo, tmp_path_factory):
    """last.pth after one cross-entropy epoch on stored features and one fine-tuning the last stage."""
    folder = tmp_path_factory.mktemp("finetune")
    train(**options(demo, folder, model="attention", epoch=1, finetune_encoder=1, finetune_epoch=1, eval_size=0,
                    metric="val_loss", num_workers=0, lr_patience=0))
    return load_checkpoint(str(folder / "checkpoints" / "last.pth"))


@pretrained
def test_finetuning_changes_the_last_stage_and_nothing_else(finetuned):
    before = build_backbone("mobilenet_v2", "default").state_dict()
    after = finetuned["encoder"]
    assert finetuned["state"]["phase"] == "fine-tuning" and after.keys() == before.keys()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    # MobileNetV2's last stage: inverted residual 17 and the final 1x1 convolution 18 (see encoder.py)
    assert changed and all(key.split(".")[0] in ("17", "18") for key in changed)
    assert any(key.startswith("17.") for key in changed) and any(key.startswith("18.") for key in changed)
    assert not [key for key in changed if "running_" in key or "num_batches" in key]  # BatchNorm statistics stay


@pretrained
def test_a_finetuned_checkpoint_captions_with_its_own_encoder(demo, finetuned, tmp_path):
    path = str(tmp_path / "finetuned.pth")
    torch.save(finetuned, path)
    images = sorted(os.path.join(demo.img_path, name) for name in os.listdir(demo.img_path))[:4]
    opt = options(demo, model_ckpt=path, n_best=2, use_gpu=False)
    captions, errors = caption_images(images, type(demo)(**opt))
    assert not errors and len(captions) == 4

    model, vocab = model_from_checkpoint(finetuned, path), finetuned["ix2word"]
    habits = Habits(tuple(finetuned["unfinished"]), tuple(finetuned["repeatable"]))

    def beams_with(trunk):
        _, regions, _ = next(encode_images(trunk.eval(), "mobilenet_v2", images, torch.device("cpu"), 8, 0, grid=7))
        return caption_features(model, regions, vocab, type(demo)(**opt), habits=habits)

    own = build_backbone("mobilenet_v2", "none")
    own.load_state_dict(finetuned["encoder"])
    expected = beams_with(own)
    for got, want in zip(captions.values(), expected):
        assert [text for text, _, _ in got] == [text for text, _, _ in want]
        assert [score for _, score, _ in got] == pytest.approx([score for _, score, _ in want], rel=1e-5)  # fp noise
    pretrained = beams_with(build_backbone("mobilenet_v2", "default"))
    assert [b[0][1] for b in pretrained] != pytest.approx([b[0][1] for b in expected], abs=1e-5)


def test_flips_spare_images_whose_captions_or_extra_text_say_left_or_right():
    words = ["</PAD>", "</EOS>", "</UNKNOWN>", "一个人", "跑步", "狗", "女人", "左手", "拿着伞", "右边", "有车"]

    def encoded(*sentences):
        return [[words.index(word) for word in sentence.split()] for sentence in sentences]

    data = {"ix2word": words, "word2ix": {word: ix for ix, word in enumerate(words)}, "unknown": "</UNKNOWN>",
            "caption": [encoded("一个人 跑步"), encoded("狗", "女人 左手 拿着伞"), encoded("右边 有车"), encoded("狗")],
            "extra_caption": [[], [], [], encoded("女人 左手 拿着伞")]}  # image 3: its extra text says 左
    split = CaptionSplit(data, np.zeros((4, 2), np.float16), {"img_path": ""}, range(4))
    assert TrainingImages(split, "mobilenet_v2", augment=True).sided == {1, 2, 3}


def test_encoder_stages_that_learn(demo):
    trunk = build_backbone("mobilenet_v2", "none")
    encoder = Encoder("mobilenet_v2", trunk, 2, grid=0)
    learning = {name.split(".")[1] for name, p in encoder.named_parameters() if p.requires_grad}
    assert learning == {"14", "15", "16", "17", "18"}  # stages 6 (blocks 14-16) and 7 (17 and the head)
    encoder.train()
    assert not any(module.training for module in encoder.modules())  # BatchNorm stays in eval mode
    with pytest.raises(UserError, match="mobilenet_v2 has 7 stages"):
        Encoder("mobilenet_v2", build_backbone("mobilenet_v2", "none"), 8, grid=0)
