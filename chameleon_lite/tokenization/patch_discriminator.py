"""PatchGAN discriminator and hinge losses for adversarial training of the VQ image tokenizer.

Notable choices: pix2pix's N-layer PatchGAN (4x4 convs, LeakyReLU 0.2), with GroupNorm instead of BatchNorm so
it behaves the same at any batch size and under DDP; hinge losses as in VQGAN.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """Images (B, C, H, W) -> real/fake logits per patch (B, 1, h', w').

    Args:
        in_channels: image channels.
        channels: width of the first layer; doubles per layer up to 8x.
        num_layers: stride-2 layers (receptive field grows with each; 3 suits 64x64 images).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        if channels < 1 or num_layers < 1:
            raise ValueError(f"channels and num_layers must be >= 1, got {channels} and {num_layers}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, num_layers + 1):
            out_width = channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(width, out_width, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(min(32, out_width), out_width),
                nn.LeakyReLU(0.2),
            ]
            width = out_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)  # (B, 1, h', w')


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(real))) + mean(relu(1 + D(fake))), halved."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """Generator hinge loss: -mean(D(fake))."""
    return -fake_logits.mean()
