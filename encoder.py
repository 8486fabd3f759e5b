"""The trainable image encoder of `--finetune-encoder=N`: a backbone whose last N stages learn
with the captioner, and the training images it reads.

A stage is a run of blocks at one resolution and width:
- ResNet: layer1 .. layer4 (N=3 trains layer2-4, as the Show-Attend-Tell course does);
- MobileNetV2: its 7 inverted-residual stages (1, 2, 3, 4, 3, 3, 1 blocks), the final 1x1
  convolution counted with the last;
- EfficientNet-Lite2: its 7 MBConv stages (1, 3, 3, 4, 4, 5, 1 blocks), the head convolution
  counted with the last.
Everything before the last N stages is frozen, and BatchNorm everywhere keeps ImageNet's
statistics (eval mode): caption batches are too small and too alike to re-estimate them.
"""
import numpy as np
import torch
from PIL import ImageOps
from torch import nn
from torch.utils.data import DataLoader, Dataset

from config import UserError
from images import UNREADABLE, encode_images, image_transform, load_image, pooled, regions, says_side

MOBILENET_V2_STAGE_BLOCKS = (1, 2, 3, 4, 3, 3, 1)  # torchvision's inverted_residual_setting, n column
# How many stages each backbone has (what `stages` finds), known before one is built.
STAGE_COUNTS = {"resnet50": 4, "resnet101": 4, "resnet152": 4, "mobilenet_v2": 7, "efficientnet_lite2": 7}


def stages(backbone, trunk):
    """The trunk's stages, first to last, each a list of modules."""
    if backbone.startswith("resnet"):
        return [[trunk[i]] for i in range(4, 8)]  # conv1, bn1, relu, maxpool, then layer1..layer4
    if backbone == "mobilenet_v2":
        return _grouped(list(trunk[1:-1]), MOBILENET_V2_STAGE_BLOCKS, head=[trunk[-1]])
    if backbone == "efficientnet_lite2":
        network = trunk.network
        return _grouped(list(network._blocks), network.stage_blocks, head=[network._conv_head, network._bn1])
    raise UserError(f"--finetune-encoder: no stages known for backbone {backbone}")


def _grouped(blocks, sizes, head):
    groups, start = [], 0
    for size in sizes:
        groups.append(blocks[start:start + size])
        start += size
    groups[-1] += head
    return groups


class Encoder(nn.Module):
    """images (B, 3, S, S) -> the features the decoder reads: pooled (B, F), or with grid regions
    (B, G*G, F). Only the last `trainable` stages of the trunk learn."""

    def __init__(self, backbone, trunk, trainable, grid):
        super().__init__()
        self.backbone, self.trunk, self.grid = backbone, trunk, grid
        all_stages = stages(backbone, trunk)
        if not 1 <= trainable <= len(all_stages):
            raise UserError(f"--finetune-encoder={trainable}: {backbone} has {len(all_stages)} stages")
        trunk.requires_grad_(False)
        for stage in all_stages[-trainable:]:
            for module in stage:
                module.requires_grad_(True)
        self.eval()

    def train(self, mode=True):
        """Always eval mode: BatchNorm statistics stay ImageNet's."""
        return super().train(False)

    def forward(self, images):
        feature_map = self.trunk(images.contiguous(memory_format=torch.channels_last))  # (B, F, h, w)
        return regions(feature_map, self.grid) if self.grid else pooled(feature_map)

    def features_of(self, split, rows, opt, device):
        """The features of a split's rows, encoded from their images as the encoder is now (for
        validation and the dashboard) -> (b, F) or (b, R, F) on the device."""
        paths = [split.image_path(row) for row in rows]
        encoded = encode_images(self.trunk, self.backbone, paths, device, opt.batch_size, opt.num_workers, self.grid)
        return torch.cat([pooled if regions is None else regions for pooled, regions, _ in encoded]).to(device)

    def encoded_split(self, split, opt, device):
        """The split with its features encoded from its images as the encoder is now (for validation)."""
        encoded = self.features_of(split, split.rows, opt, device).cpu().numpy()  # (n, F) or (n, R, F)
        features = np.zeros((max(split.rows) + 1, *encoded.shape[1:]), np.float16)
        features[split.rows] = encoded
        return split.with_features(features)


class TrainingImages(Dataset):
    """A split's images by row, prepared for the backbone -> ((3, S, S), row). With augment: a random
    crop of 60-100% of the image, and a horizontal flip half the time, except for images with a
    caption that says 左 or 右 (one encoding serves all captions of an image, so such an image is
    never flipped)."""

    def __init__(self, split, backbone, augment):
        self.split, self.transform, self.augment = split, image_transform(backbone), augment
        self.crop = None
        if augment:
            from torchvision.transforms import RandomResizedCrop
            self.crop = RandomResizedCrop(self.transform.size, scale=(0.6, 1.0))
        self.sided = {int(row) for row in split.rows if says_side(split.training_text(row))}

    def __len__(self):
        return len(self.split.rows)

    def __getitem__(self, row):
        try:
            image = load_image(self.split.image_path(row))
        except UNREADABLE as error:
            raise UserError(f"{self.split.image_path(row)}: unreadable ({type(error).__name__}); fine-tuning reads "
                            "every training image") from None
        if self.augment:
            image = self.crop(image)
            if row not in self.sided and np.random.random() < 0.5:
                image = ImageOps.mirror(image)
        return self.transform(image), row


def image_batches(images, row_batches, num_workers, device):
    """Yield (rows (b,), images (b, 3, S, S)) for each batch of rows, read by DataLoader workers."""
    loader = DataLoader(images, batch_sampler=row_batches, num_workers=num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=_seed_worker)
    for pixels, rows in loader:
        yield rows.numpy(), pixels


def image_caption_batches(images, row_batches, with_captions, num_workers, device):
    """Yield training batches from images: (rows (b,), images (b, 3, S, S)) + (captions (n, T),
    lengths (n,), the image of each caption (n,)) with_captions."""
    split = images.split
    for rows, pixels in image_batches(images, row_batches, num_workers, device):
        pixels = pixels.to(device, memory_format=torch.channels_last, non_blocking=True)
        if not with_captions:
            yield rows, pixels
            continue
        captions, lengths, image_of = split.captions_of_images(rows)
        yield rows, pixels, captions, lengths, image_of.to(device)


def _seed_worker(_worker):
    """Each worker its own augmentation draws (numpy's state is otherwise copied from the parent)."""
    np.random.seed(torch.initial_seed() % 2 ** 32)
