"""The blobs dataset, made unlike --dataset synthetic to check the label-free score on data it
was not designed on (README, "Choosing a checkpoint without labels"):

    python tools/blobs.py DIR

writes DIR/{train,test}/{images,masks}: 2000 and 2000 images, each a smooth many-coloured
noise background with a shaded blob of random outline, size and place, as JPEG with PNG
masks, in the layout of --dataset folder with --maskroot (the test split of DIR/test, 200
images, is the test set of tools/label_free_check.py --test-folder).
"""
import argparse
import os

import numpy as np
from PIL import Image


def smooth_noise(rng, n, cells):
    """(n, n) values in [0, 1], bilinear interpolation of a random (cells+1)^2 grid."""
    grid = rng.uniform(0, 1, (cells + 1, cells + 1))
    t = np.linspace(0, cells, n, endpoint=False)
    i, f = t.astype(int), t % 1
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None] + rows[:, i + 1] * f[None]


def blob_scene(rng, n=128):
    """A background of three colours mixed by smooth noise at two scales, and a blob (star-
    shaped outline of 2 to 5 harmonics, 6% to 35% of the image) shaded as if lit from one
    side, in a colour at least 0.5 (L1) from the background's mean."""
    colours = rng.uniform(0, 1, (3, 3))
    weights = np.stack([smooth_noise(rng, n, 3) + 0.5 * smooth_noise(rng, n, 9) for _ in range(3)])
    weights = np.exp(4 * weights)
    background = np.einsum("khw,kc->hwc", weights / weights.sum(0), colours)
    while True:
        colour = rng.uniform(0, 1, 3)
        if np.abs(colour - background.mean((0, 1))).sum() > 0.5:
            break
    yy, xx = (np.mgrid[:n, :n] + 0.5) / n
    area = rng.uniform(0.06, 0.35)
    radius = np.sqrt(area / np.pi)
    cx, cy = rng.uniform(radius, 1 - radius, 2)
    angle, dist = np.arctan2(yy - cy, xx - cx), np.hypot(yy - cy, xx - cx)
    harmonics = rng.integers(2, 6)
    outline = 1 + sum(rng.uniform(0, 0.25) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
                      for k in range(2, 2 + harmonics))
    mask = dist < radius * outline / 1.1
    light = rng.uniform(0, 2 * np.pi)
    shade = 0.75 + 0.25 * np.cos(angle - light) * np.clip(dist / radius, 0, 1)
    image = np.where(mask[..., None], colour * shade[..., None], background)
    image = np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1)
    return (image * 255).astype(np.uint8), mask


def make_blobs(root, n=2000, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        image, mask = blob_scene(rng)
        for kind, array, ext in (("images", image, "jpg"), ("masks", mask.astype(np.uint8) * 255, "png")):
            os.makedirs(os.path.join(root, kind), exist_ok=True)
            Image.fromarray(array).save(os.path.join(root, kind, "%05d.%s" % (i, ext)), quality=95)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    args = p.parse_args()
    make_blobs(os.path.join(args.root, "train"), seed=0)
    make_blobs(os.path.join(args.root, "test"), seed=1)


if __name__ == "__main__":
    main()
