"""Networks of the ``cifar10`` fitness plug-in, in plain torch (torchvision is not needed).

* ``resnet18``: the CIFAR variant of ResNet-18 (He et al. 2016) used across the CIFAR
  literature and by the DiscoPOP paper's classification case study: a 3x3 stem without
  max-pooling, four stages of two basic blocks (64, 128, 256, 512 channels at ``width=64``),
  global average pooling. 11.2M parameters, 0.56 GMACs per 32x32 image.
* ``airbench``: a small fast network in the style of the CIFAR-10 speed runs (Jordan 2024,
  "94% on CIFAR-10 in 3.29 seconds on a single GPU", arXiv:2404.00498): a frozen 2x2 patch-
  whitening convolution set from the data, three conv-pool-norm groups (64, 256, 256
  channels), identity-initialised convolutions, batch norm without a trainable scale and a
  scaled-down linear head. About 2M parameters, 0.24 GFLOPs per image forward.
* ``cnn``: a plain four-layer CNN (16, 32, 64, 128 channels at ``width=16``) for the ``cpu``
  preset: 15M MACs per image, so a few thousand images train in seconds on one core.

Every network takes ``width`` (its base channel count) and ``classes``, and is initialised
from the global torch RNG by :func:`initialise` so that a cached (compiled) network and a new
one start from the same weights for the same seed.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

#: Architectures by name, with their default base width.
ARCH_WIDTHS = {"resnet18": 64, "airbench": 64, "cnn": 16}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: (batch, 3, 32, 32) images -> (batch, classes) logits."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, channels = [], width
        for multiple, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            out = width * multiple
            stages += [BasicBlock(channels, out, stride), BasicBlock(out, out, 1)]
            channels = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _IdentityConv(nn.Conv2d):
    """3x3 'same' convolution whose first ``in_channels`` filters start as the identity (an
    implicit residual connection, as in the speed runs)."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__(channels_in, channels_out, 3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            nn.init.dirac_(self.weight[: self.weight.size(1)])


class _FrozenScaleNorm(nn.BatchNorm2d):
    """Batch norm with a fixed unit scale and a trainable shift; a high running-stat momentum
    because a fast run has few steps."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class _ConvGroup(nn.Module):
    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.conv1 = _IdentityConv(channels_in, channels_out)
        self.norm1 = _FrozenScaleNorm(channels_out)
        self.conv2 = _IdentityConv(channels_out, channels_out)
        self.norm2 = _FrozenScaleNorm(channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """Speed-run style network: (batch, 3, 32, 32) -> (batch, classes) logits.

    Call :meth:`initialise_whitening` with training images after (re-)initialisation: the
    first layer is a fixed whitening transform of 2x2 patches, not a learned one.
    """

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)  # 2 * 3 * 2 * 2 channels: +/- eigenvectors
        self.whiten.weight.requires_grad_(False)
        self.groups = nn.Sequential(
            _ConvGroup(24, width), _ConvGroup(width, 4 * width), _ConvGroup(4 * width, 4 * width)
        )
        self.head = nn.Linear(4 * width, classes, bias=False)
        # A small head scale keeps the initial logits near uniform (the speed runs use 1/9).
        self.scale = 1 / 9

    @torch.no_grad()
    def initialise_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first layer to whiten the 2x2 patches of ``images`` (batch, 3, 32, 32)."""
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)  # (n, 3, 31, 31, 2, 2)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
        covariance = patches.T @ patches / patches.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(12, 3, 2, 2)
        filters = filters.flip(0)  # largest eigenvalue first
        self.whiten.weight.copy_(torch.cat((filters, -filters)).to(self.whiten.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(F.gelu(self.whiten(x)))
        x = torch.flatten(F.max_pool2d(x, x.shape[-1]), 1)
        return self.head(x) * self.scale


class SmallCNN(nn.Module):
    """Four conv-norm-ReLU layers (three followed by 2x2 max-pooling), global average pooling,
    a linear head: (batch, 3, 32, 32) -> (batch, classes)."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for index, out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            if index > 0:
                layers.append(nn.MaxPool2d(2))
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def build(arch: str, width: int | None = None, classes: int = 10) -> nn.Module:
    """A network by name (see :data:`ARCH_WIDTHS`); ``width`` defaults to the architecture's own.

    Raises:
        ValueError: An unknown name or a bad width.
    """
    if arch not in ARCH_WIDTHS:
        raise ValueError(f"arch must be one of {', '.join(ARCH_WIDTHS)}; got {arch!r}")
    width = ARCH_WIDTHS[arch] if width is None else width
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    cls = {"resnet18": ResNet18, "airbench": AirbenchNet, "cnn": SmallCNN}[arch]
    return cls(width=width, classes=classes)


@torch.no_grad()
def initialise(model: nn.Module, seed: int) -> None:
    """Re-initialise every layer in place from ``seed`` (batch-norm statistics included).

    Resetting in place keeps the parameter objects, so a ``torch.compile``-d wrapper of
    ``model`` stays valid across candidates.
    """
    torch.manual_seed(seed)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset) and module is not model:
            reset()  # batch norm: unit scale, zero shift, fresh running statistics


def norm_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters split into (normalisation layers', everything else), for the
    speed runs' larger learning rate on batch-norm shifts."""
    norm_ids = {
        id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [p for p in trainable if id(p) in norm_ids], [p for p in trainable if id(p) not in norm_ids]
