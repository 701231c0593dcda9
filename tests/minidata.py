"""Miniature datasets in the exact on-disk formats of Flowers, CUB, LFW and MNIST.

Each image is a plain background with an ellipse of another colour (the object); the
masks say where the ellipse is, in each dataset's own mask format. Deterministic for a seed.
"""
import os
import struct

import numpy as np
from PIL import Image
from scipy import io


def _scene(rng, width, height):
    """An RGB image (H, W, 3) uint8 and its boolean object mask."""
    yy, xx = np.mgrid[:height, :width]
    cx, cy = rng.uniform(.35, .65) * width, rng.uniform(.35, .65) * height
    rx, ry = rng.uniform(.15, .3) * width, rng.uniform(.15, .3) * height
    mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    image = np.empty((height, width, 3), np.uint8)
    image[:] = rng.integers(20, 120, 3)
    image[mask] = rng.integers(140, 250, 3)
    image = np.clip(image + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
    return image, mask


def _save_jpg(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


def make_flowers(root, n_train=6, n_val=4, n_test=4, seed=0, size=None):
    """jpg/image_%05d.jpg, segmim/segmim_%05d.jpg (background painted pure blue) and setid.mat.
    As in the real set, train = 'tstid', val = 'valid', test = 'trnid'. size: (width, height)
    of every image, or small varied sizes."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    for i in range(1, n + 1):
        image, mask = _scene(rng, *(size or (96 + 4 * (i % 3), 80)))
        _save_jpg(os.path.join(root, "jpg", "image_%05d.jpg" % i), image)
        seg = image.copy()
        seg[~mask] = (0, 0, 254)
        _save_jpg(os.path.join(root, "segmim", "segmim_%05d.jpg" % i), seg)
    ids = np.arange(1, n + 1)
    io.savemat(os.path.join(root, "setid.mat"), {
        "tstid": ids[:n_train][None].astype(np.uint16),
        "valid": ids[n_train:n_train + n_val][None].astype(np.uint16),
        "trnid": ids[n_train + n_val:][None].astype(np.uint16)})
    return root


def make_cub(root, n_train=6, n_val=4, n_test=4, seed=0):
    """images.txt, train_val_test_split.txt (0/1/2), images/<class>/<name>.jpg and soft
    grayscale segmentations/<class>/<name>.png; one image is grayscale, as some CUB images are."""
    rng = np.random.default_rng(seed)
    splits = [0] * n_train + [1] * n_val + [2] * n_test
    rng.shuffle(splits)
    lines, split_lines = [], []
    for i, split in enumerate(splits, 1):
        name = "%03d.Bird_%d/Bird_%d_%04d_%d.jpg" % (i % 2 + 1, i % 2, i % 2, i, 100 + i)
        image, mask = _scene(rng, 90, 70 + 6 * (i % 2))
        if i == 2:
            image = image.mean(2).astype(np.uint8)
        _save_jpg(os.path.join(root, "images", name), image)
        soft = np.where(mask, rng.integers(140, 256, mask.shape), rng.integers(0, 100, mask.shape)).astype(np.uint8)
        seg_path = os.path.join(root, "segmentations", name[:-3] + "png")
        os.makedirs(os.path.dirname(seg_path), exist_ok=True)
        Image.fromarray(soft, "L").save(seg_path)
        lines.append("%d %s" % (i, name))
        split_lines.append("%d %d" % (i, split))
    with open(os.path.join(root, "images.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "train_val_test_split.txt"), "w") as f:
        f.write("\n".join(split_lines) + "\n")
    return root


def make_lfw(root, n_train=6, n_val=4, n_test=4, seed=0):
    """lfw_funneled/<person>/<person>_%04d.jpg (250x250), part labels
    parts_lfw_funneled_gt_images/<person>_%04d.ppm (red hair, green face, blue background)
    for val and test, and the split files train.txt, val.txt, test.txt."""
    rng = np.random.default_rng(seed)
    people = ["Person_%s" % chr(ord("A") + k) for k in range(n_train + n_val + n_test)]
    counts = {"train": n_train, "val": n_val, "test": n_test}
    start = 0
    for split, count in counts.items():
        lines = []
        for person in people[start:start + count]:
            name = "%s_%04d" % (person, 1)
            image, mask = _scene(rng, 250, 250)
            _save_jpg(os.path.join(root, "lfw_funneled", person, name + ".jpg"), image)
            if split != "train":
                parts = np.zeros(image.shape, np.uint8)
                parts[~mask] = (0, 0, 255)
                parts[mask] = (0, 255, 0)
                parts[mask & (np.arange(250)[:, None] < 100)] = (255, 0, 0)
                os.makedirs(os.path.join(root, "parts_lfw_funneled_gt_images"), exist_ok=True)
                Image.fromarray(parts).save(os.path.join(root, "parts_lfw_funneled_gt_images", name + ".ppm"))
            lines.append("%s %s" % (person, name))
        with open(os.path.join(root, split + ".txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        start += count
    return root


def make_mnist(root, n_train=40, n_test=20, seed=0):
    """MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (the uncompressed IDX files
    torchvision reads), with blobs for digits."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 28, 28), np.uint8)
        for k in range(n):
            images[k, rng.integers(4, 10):rng.integers(18, 24), rng.integers(4, 10):rng.integers(18, 24)] = 255
        labels = (np.arange(n) % 10).astype(np.uint8)
        with open(os.path.join(raw, prefix + "-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        with open(os.path.join(raw, prefix + "-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + labels.tobytes())
    return root


def make_folder(root, n=12, with_masks=True, seed=0):
    """images/{a,b}/imgNN.jpg of varied widths, and with_masks, masks/{a,b}/imgNN.png (white
    on the object): a folder of one's own images for --dataset folder (root: a pathlib.Path)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = 60 + 7 * i, 80
        image = np.full((h, w, 3), rng.integers(0, 100, 3), np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[20:60, 15:45] = 255
        image[mask > 0] = rng.integers(150, 255, 3)
        sub = "a" if i % 2 else "b"
        os.makedirs(root / "images" / sub, exist_ok=True)
        Image.fromarray(image).save(root / "images" / sub / ("img%02d.jpg" % i))
        if with_masks:
            os.makedirs(root / "masks" / sub, exist_ok=True)
            Image.fromarray(mask).save(root / "masks" / sub / ("img%02d.png" % i))


MAKERS = {"flowers": make_flowers, "cub": make_cub, "lfw": make_lfw, "cmnist": make_mnist}
