"""Classifiers: a CPU-friendly small CNN and a CIFAR-style ResNet-18.

Every model exposes ``features(x)`` (the penultimate activations, the ``a`` of docs/methods.md) and a
final ``head`` (``nn.Linear``), so last-layer scores need nothing model-specific.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.errors import OptionError

MODEL_NAMES = ("auto", "small-cnn", "resnet18")
HEAD_MODEL = "linear"  # the head alone, trained on a frozen backbone's features (engine.frozen)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages and global pooling; pools early for images of 16 px and more."""

    def __init__(self, in_channels: int, num_classes: int, *, image_size: int, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = _conv_bn(in_channels, width)
        if image_size >= 16:
            layers.append(nn.MaxPool2d(2))
        layers += _conv_bn(width, 2 * width) + [nn.MaxPool2d(2)] + _conv_bn(2 * width, 4 * width)
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()  # modules, not torch.relu: the activations a dropout ensemble drops
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()  # the block's output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 images: 3×3 stem, no max-pool (the usual CIFAR variant)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, 64))
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class LinearHead(nn.Module):
    """A linear classifier on feature rows: ``features`` is the identity (the frozen backbone ran once
    beforehand), so every scorer's ``features(x)`` + ``head`` sees exactly the convex head problem."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def is_rgb_32px_or_more(image_shape: tuple[int, ...]) -> bool:
    """Colour photos of CIFAR-10's size or larger (H×W×3, both sides ≥ 32): where the model and the
    fine-tune recipe change."""
    return len(image_shape) == 3 and image_shape[2] == 3 and min(image_shape[:2]) >= 32


def choose_model(image_shape: tuple[int, ...], device: torch.device) -> str:
    """ResNet-18 for RGB images of 32 px and more on a GPU; the small CNN everywhere else (the head
    alone on feature rows)."""
    if len(image_shape) == 1:
        return HEAD_MODEL
    return "resnet18" if device.type == "cuda" and is_rgb_32px_or_more(image_shape) else "small-cnn"


def build_model(name: str, image_shape: tuple[int, ...], num_classes: int, device: torch.device) -> nn.Module:
    """Build the named model (``auto`` resolves by :func:`choose_model`) for the image shape."""
    if name not in (*MODEL_NAMES, HEAD_MODEL):
        raise OptionError("model", name, MODEL_NAMES)
    if name == "auto":
        name = choose_model(image_shape, device)
    if (name == HEAD_MODEL) != (len(image_shape) == 1):  # the head alone is for feature rows only
        raise OptionError("model", name, MODEL_NAMES)
    if name == HEAD_MODEL:
        return LinearHead(image_shape[0], num_classes)
    channels = 1 if len(image_shape) == 2 else image_shape[2]
    if name == "resnet18":
        return ResNet18(channels, num_classes)
    return SmallCNN(channels, num_classes, image_size=min(image_shape[:2]))
