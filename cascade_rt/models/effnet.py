"""EfficientNetEncoder: pixels -> Stage C latent space (official `modules/effnet.py`), docs/reference.md §1.6.

The backbone is torchvision's efficientnet_v2_s `features` built with `weights=None` (the checkpoint carries every
backbone weight, so nothing is downloaded), followed by a 1x1 conv to 16 channels and an affine-free BatchNorm.
Input: RGB in [0, 1] normalised with the ImageNet statistics (`normalize_imagenet`).
"""

from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_imagenet(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> ImageNet-normalised, the EfficientNet input."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


class EfficientNetEncoder(nn.Module):
    def __init__(self, c_latent: int = 16) -> None:
        super().__init__()
        from torchvision.models import efficientnet_v2_s  # 3 s to import; only this model needs it

        self.backbone = efficientnet_v2_s(weights=None).features.eval()
        self.mapper = nn.Sequential(
            nn.Conv2d(1280, c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_latent, affine=False),
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.mapper[0].weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised (B,3,H,W) -> (B,16,H/32,W/32)."""
        return self.mapper(self.backbone(x.to(self.dtype)))
