"""Augmentations for training on few images, each off by default: random horizontal flips of
the training images (--hflip), and differentiable augmentation of what the discriminator sees
(--diffAugment; Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training",
NeurIPS 2020). With a few hundred images netDX memorises the real ones; shown every image
through random translations, cutouts and colour changes, real and composite alike, it cannot.

Every random number comes from the global CPU generator (saved in checkpoints, so a resumed
run draws what an uninterrupted one draws), for the whole batch of every rank, each rank
taking its share: as the noise z, the same draws on any device and any number of processes.
"""
import argparse
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")
TRANSLATION = 1 / 8  # the largest shift, as a fraction of the image side (DiffAugment's)
CUTOUT = 1 / 2  # the side of the square cut out, as a fraction of the image side (DiffAugment's)


def policy(text):
    """--diffAugment's value: 'translation,cutout' -> ('translation', 'cutout'); '' -> ()."""
    names = tuple(name for name in text.split(",") if name)
    unknown = [name for name in names if name not in POLICIES]
    if unknown:
        raise argparse.ArgumentTypeError("unknown transform %s (expected a comma-separated list of %s)"
                                         % (", ".join(unknown), ", ".join(POLICIES)))
    return names


def draw_flips(n):
    """Whether to flip each of n images (half of them, on average)."""
    return torch.rand(n) < 0.5


def flip_horizontally(x, flips):
    """x (N, C, H, W) with the images where flips is True mirrored left to right."""
    return torch.where(flips.to(x.device)[:, None, None, None], x.flip(3), x)


@dataclass
class DiffAugment:
    """One random transform per image of a batch, for the discriminator's input: applied
    to a real image and to the composites of the image it is compared with, alike."""
    brightness: Optional[torch.Tensor] = None  # (N,) in [0, 1): adds brightness - 0.5
    saturation: Optional[torch.Tensor] = None  # (N,) in [0, 1): scales the chroma by 2 x this
    contrast: Optional[torch.Tensor] = None  # (N,) in [0, 1): scales the deviation from the mean by this + 0.5
    shift: Optional[torch.Tensor] = None  # (N, 2) pixels down and right, the vacated border zero
    cutout: Optional[torch.Tensor] = None  # (N, 2) the centre (row, column) of the square set to zero

    @classmethod
    def draw(cls, names, n, size):
        """Transforms `names` (a subset of POLICIES, drawn in POLICIES' order) for n images of size x size."""
        drawn = {}
        if "color" in names:
            drawn.update(brightness=torch.rand(n), saturation=torch.rand(n), contrast=torch.rand(n))
        if "translation" in names:
            largest = int(size * TRANSLATION + 0.5)
            drawn["shift"] = torch.randint(-largest, largest + 1, (n, 2))
        if "cutout" in names:
            drawn["cutout"] = torch.randint(0, size, (n, 2))
        return cls(**drawn)

    def map(self, function):
        """The transforms with function applied to each drawn tensor (e.g. a rank's share)."""
        return DiffAugment(**{name: function(t) for name, t in self.drawn().items()})

    def drawn(self):
        """{field name: tensor} of the transforms drawn."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __call__(self, x):
        """x (N * k, C, H, W): rows i * k to i * k + k - 1 get transform i."""
        k = len(x) // len(next(iter(self.drawn().values())))

        def each(t):
            return t.to(x.device).repeat_interleave(k, 0)
        if self.brightness is not None:
            x = x + (each(self.brightness) - 0.5)[:, None, None, None]
            mean = x.mean(1, keepdim=True)
            x = (x - mean) * (each(self.saturation) * 2)[:, None, None, None] + mean
            mean = x.mean((1, 2, 3), keepdim=True)
            x = (x - mean) * (each(self.contrast) + 0.5)[:, None, None, None] + mean
        if self.shift is not None:
            x = translate(x, each(self.shift))
        if self.cutout is not None:
            x = cut_out(x, each(self.cutout))
        return x


def translate(x, shift):
    """x moved by shift (N, 2) pixels (rows, columns), zeros where nothing moves in."""
    n, _, h, w = x.shape
    pad = int(shift.abs().max())
    padded = F.pad(x, [pad, pad, pad, pad])
    rows = torch.arange(h, device=x.device)[None] - shift[:, :1] + pad  # (N, H)
    cols = torch.arange(w, device=x.device)[None] - shift[:, 1:] + pad  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def cut_out(x, centre):
    """x with a square of side CUTOUT x its width, centred at centre (N, 2) (rows and columns
    centre - side / 2 to centre + side / 2 - 1), set to zero; clipped at the border."""
    n, _, h, w = x.shape
    half = int(w * CUTOUT + 0.5) // 2
    rows = torch.arange(h, device=x.device)[None] - centre[:, :1]  # (N, H)
    cols = torch.arange(w, device=x.device)[None] - centre[:, 1:]  # (N, W)
    inside_rows, inside_cols = (rows >= -half) & (rows < half), (cols >= -half) & (cols < half)
    keep = ~(inside_rows[:, :, None] & inside_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)
