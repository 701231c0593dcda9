"""The datasets of the original (Flowers, CUB, LFW and the coloured-MNIST toy), read from
their published on-disk formats, with the original's splits and preprocessing; ours (the
built-in synthetic set, a folder of one's own images); the in-memory cache, the loaders and
the resumable training batch streams.

Every item is (image, mask): the image (3, sizex, sizex) in [-1, 1], the mask
(1, sizex, sizex) with 1 on the object. Images and masks are resized (shorter side to
sizex, nearest neighbour) and centre-cropped, as in the original.
"""
import functools
import os
import random
import signal
import threading

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from scipy import io

from utils import UserError, derived_seed

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

LAYOUTS = {
    "flowers": "DATAROOT/jpg/image_00001.jpg ..., DATAROOT/segmim/segmim_00001.jpg ..., DATAROOT/setid.mat",
    "cub": "DATAROOT/images.txt, DATAROOT/train_val_test_split.txt (from this repository), "
           "DATAROOT/images/<class>/<name>.jpg, DATAROOT/segmentations/<class>/<name>.png",
    "lfw": "DATAROOT/train.txt, val.txt, test.txt (from this repository), "
           "DATAROOT/lfw_funneled/<person>/<name>.jpg, DATAROOT/parts_lfw_funneled_gt_images/<name>.ppm",
    "cmnist": "DATAROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (downloaded when online)",
}
LAYOUTS["lfw+flowers"] = "--dataroot LFW_ROOT,FLOWERS_ROOT, each as for --dataset lfw and --dataset flowers"


def image_files(folder):
    """Paths, relative to folder, of the image files under it (recursively), sorted."""
    return sorted(os.path.relpath(os.path.join(parent, name), folder)
                  for parent, _, names in os.walk(folder) for name in names
                  if name.lower().endswith(IMAGE_EXTENSIONS))


def resize_and_crop(sizex):
    """The original's preprocessing: shorter side to sizex (nearest), centre crop, to [0, 1]."""
    return T.Compose([T.Resize(sizex, T.InterpolationMode.NEAREST), T.CenterCrop(sizex), T.ToTensor()])


def open_image(path, mode=None):
    """Decode an image file; an unreadable one is a UserError that names it."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode) if mode and img.mode != mode else img
    except FileNotFoundError:
        raise UserError("%s: image file missing" % path) from None
    except OSError as e:
        raise UserError("%s: cannot decode this image (%s)" % (path, e)) from None


def require_files(dataset, root, *names):
    """Fail early, naming the first missing file or folder and the expected layout."""
    if not os.path.isdir(root):
        raise UserError("--dataroot %s: no such folder (expected for --dataset %s: %s)"
                        % (root, dataset, LAYOUTS[dataset]))
    for name in names:
        if not os.path.exists(os.path.join(root, name)):
            raise UserError("--dataroot %s: missing %s (expected for --dataset %s: %s)"
                            % (root, name, dataset, LAYOUTS[dataset]))


def check_split(split):
    if split not in SPLITS:
        raise ValueError("split must be one of %s, not %r" % (SPLITS, split))


class FlowersDataset(torch.utils.data.Dataset):
    """Oxford Flowers 102 with the segmentations of Nilsback & Zisserman.

    As in the original (and the paper), the splits of setid.mat are used crosswise:
    train = 'tstid' (6149 images), val = 'valid', test = 'trnid'. The segmentation
    images paint the background pure blue; a pixel is background when its red or green
    value is 0 or its blue value is 254 (the original's rule).
    """
    SETID_KEYS = {"train": "tstid", "val": "valid", "test": "trnid"}

    def __init__(self, dataPath, sets="train", transform=None, sizex=128):
        check_split(sets)
        require_files("flowers", dataPath, "setid.mat", "jpg", "segmim")
        try:
            setid = io.loadmat(os.path.join(dataPath, "setid.mat"))
            self.files = setid[self.SETID_KEYS[sets]][0]
        except (ValueError, KeyError, OSError, IndexError) as e:
            raise UserError("%s: not a Flowers setid.mat with tstid/valid/trnid (%s)"
                            % (os.path.join(dataPath, "setid.mat"), e)) from None
        self.transform = transform or resize_and_crop(sizex)
        self.datapath = dataPath

    def __len__(self):
        return len(self.files)

    def __getitem__(self, idx):
        number = self.files[idx]
        img = self.transform(open_image(os.path.join(self.datapath, "jpg", "image_%05d.jpg" % number), "RGB"))
        seg = np.array(open_image(os.path.join(self.datapath, "segmim", "segmim_%05d.jpg" % number), "RGB"))
        background = (seg[:, :, 0] == 0) | (seg[:, :, 1] == 0) | (seg[:, :, 2] == 254)
        seg = self.transform(Image.fromarray(np.where(background, 0, 255).astype(np.uint8)))
        return img * 2 - 1, seg


class CUBDataset(torch.utils.data.Dataset):
    """Caltech-UCSD Birds 200-2011; the split file train_val_test_split.txt (0 train,
    1 val, 2 test) comes with this repository. Soft segmentations are thresholded at .5."""
    SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

    def __init__(self, dataPath, sets="train", transform=None, sizex=128):
        check_split(sets)
        require_files("cub", dataPath, "images.txt", "train_val_test_split.txt", "images", "segmentations")
        splits = _load_table(os.path.join(dataPath, "train_val_test_split.txt"), int)
        files = _load_table(os.path.join(dataPath, "images.txt"), str)
        if len(splits) != len(files):
            raise UserError("%s: %d lines, but images.txt has %d"
                            % (os.path.join(dataPath, "train_val_test_split.txt"), len(splits), len(files)))
        self.files = files[:, 1][splits[:, 1] == self.SPLIT_IDS[sets]]
        self.transform = transform or resize_and_crop(sizex)
        self.datapath = dataPath

    def __len__(self):
        return len(self.files)

    def __getitem__(self, idx):
        filename = self.files[idx]
        img = self.transform(open_image(os.path.join(self.datapath, "images", filename), "RGB"))
        seg = self.transform(open_image(os.path.join(self.datapath, "segmentations", filename[:-3] + "png")))
        return img * 2 - 1, (seg[:1] > .5).float()


class LFWDataset(torch.utils.data.Dataset):
    """Labeled Faces in the Wild (funneled) with the part labels of Kae et al.; the split
    files train.txt, val.txt, test.txt come with this repository. The object is
    everything that is not background (the blue channel of the part labels). The train
    split has no masks: `has_masks` is False and its masks are NaN."""

    def __init__(self, dataPath, sets="train", transform=None, sizex=128):
        check_split(sets)
        require_files("lfw", dataPath, sets + ".txt", "lfw_funneled")
        self.has_masks = sets != "train"
        if self.has_masks:
            require_files("lfw", dataPath, "parts_lfw_funneled_gt_images")
        self.files = _load_table(os.path.join(dataPath, sets + ".txt"), str)
        self.transform = transform or resize_and_crop(sizex)
        self.datapath = dataPath

    def __len__(self):
        return len(self.files)

    def __getitem__(self, idx):
        person, name = self.files[idx, 0], self.files[idx, 1]
        img = self.transform(open_image(os.path.join(self.datapath, "lfw_funneled", person, name + ".jpg"), "RGB"))
        if self.has_masks:
            parts = self.transform(open_image(os.path.join(self.datapath, "parts_lfw_funneled_gt_images",
                                                           name + ".ppm"), "RGB"))
            seg = 1 - parts[2:]
        else:
            seg = torch.full_like(img[:1], float("nan"))
        return img * 2 - 1, seg


def _load_table(path, dtype):
    """A whitespace-separated text table (at least two columns) as a numpy array."""
    try:
        table = np.loadtxt(path, dtype, ndmin=2)
    except (ValueError, OSError) as e:
        raise UserError("%s: cannot read this table (%s)" % (path, e)) from None
    if table.shape[1] < 2:
        raise UserError("%s: expected two columns per line" % path)
    return table


class CMNISTDataset(torch.utils.data.Dataset):
    """The original's toy dataset: an even and an odd MNIST digit (each 56x56, in its own
    random colour) at random places on a plain background of random colour, 1000 images
    per split, drawn afresh at each access (the index is ignored). val and test both use
    MNIST's test set. The mask is 1 on either digit."""
    size = 128

    def __init__(self, dataPath, sets="train", transform=None, sizex=128):
        check_split(sets)
        import torchvision
        try:
            self.mnist = torchvision.datasets.MNIST(
                dataPath, train=(sets == "train"), download=True,
                transform=T.Compose([T.Resize(28 + 28, T.InterpolationMode.NEAREST), T.ToTensor()]))
        except Exception as e:  # torchvision raises RuntimeError or URLError when offline
            raise UserError("--dataset cmnist: MNIST is not in %s and could not be downloaded (%s); "
                            "expected %s" % (os.path.join(dataPath, "MNIST", "raw"), str(e).splitlines()[0][:200],
                                             LAYOUTS["cmnist"])) from None
        self.digits = {0: iter(self.mnist), 1: iter(self.mnist)}

    def __len__(self):
        return 1000

    def _next_digit(self, parity):
        """The next digit of MNIST (cycling) whose label has this parity, binarised, 3 channels."""
        while True:
            try:
                digit, label = next(self.digits[parity])
            except StopIteration:
                self.digits[parity] = iter(self.mnist)
                digit, label = next(self.digits[parity])
            if label % 2 == parity:
                return (digit > .5).float().repeat(3, 1, 1)

    def __getitem__(self, idx):
        n = self.size
        torch.randint(2, (3, 1, 1))  # the original draws a background here and discards it
        image = torch.empty(3, 1, 1).uniform_(.33, .66).repeat(1, n, n)
        image[0] = image[1]
        colours = [torch.empty(3, 1, 1).uniform_(0, .33), torch.empty(3, 1, 1).uniform_(.66, 1)]
        colours[0][1] = colours[0][2]
        colours[1][0] = colours[1][2]
        digits = [self._next_digit(0), self._next_digit(1)]
        places = [(random.randint(0, n - d.size(1) - 1), random.randint(0, n - d.size(2) - 1)) for d in digits]
        mask = torch.zeros(1, n, n)
        order = (0, 1) if random.randint(0, 1) == 0 else (1, 0)
        for k in order:
            (px, py), digit = places[k], digits[k]
            window = (slice(None), slice(px, px + digit.size(1)), slice(py, py + digit.size(2)))
            image[window] = image[window] * (1 - digit) + digit * colours[k]
            mask[window] = torch.max(mask[window], digit[:1])
        return image * 2 - 1, mask


class SyntheticDataset(torch.utils.data.Dataset):
    """A built-in dataset that needs no download: one object (ellipse, rotated rectangle,
    triangle or star-shaped blob) in two shades of a random colour, textured, on a
    low-contrast textured background of two other, near colours (gradient, stripes,
    checkerboard or smooth noise), with its exact mask.
    Image i of a split is drawn from a generator seeded by (split, i): the same images on
    every machine, computed when asked for. 2000 train, 200 val and 200 test images."""
    SIZES = {"train": 2000, "val": 200, "test": 200}

    def __init__(self, dataPath=None, sets="train", transform=None, sizex=128):
        check_split(sets)
        self.split_id = SPLITS.index(sets)
        self.size = sizex
        self.length = self.SIZES[sets]

    def __len__(self):
        return self.length

    def __getitem__(self, idx):
        rng = np.random.default_rng([20191208, self.split_id, idx])
        n = self.size
        yy, xx = np.mgrid[:n, :n] / n
        # two near colours (each channel within 0.3): a low-contrast texture, as out of focus
        base = rng.uniform(0, 1, 3)
        background_colours = np.stack([base, np.clip(base + rng.uniform(-0.3, 0.3, 3), 0, 1)])
        background = self._texture(rng, yy, xx, *background_colours)
        mask = self._shape(rng, yy, xx)
        foreground = self._texture(rng, yy, xx, *self._object_colours(rng, background_colours))
        image = np.where(mask[..., None], foreground, background)
        image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)
        return (torch.from_numpy(image.transpose(2, 0, 1)).float() * 2 - 1,
                torch.from_numpy(mask[None].astype(np.float32)))

    @staticmethod
    def _object_colours(rng, background_colours):
        """A colour and a slightly darker shade of it, each unlike every background colour
        (L1 distance over 0.6), so that the object is told from the background by its colours,
        never by its shape alone."""
        while True:
            colour = rng.uniform(0, 1, 3)
            pair = (colour, colour * rng.uniform(0.7, 0.9))
            if all(np.abs(c - b).sum() > 0.6 for c in pair for b in background_colours):
                return pair

    @staticmethod
    def _texture(rng, yy, xx, c1, c2):
        """Two colours mixed by a pattern t in [0, 1]: (H, W, 3)."""
        kind = rng.integers(4)
        angle = rng.uniform(0, np.pi)
        u = np.cos(angle) * xx + np.sin(angle) * yy
        if kind == 0:
            t = (u - u.min()) / max(u.max() - u.min(), 1e-6)
        elif kind == 1:
            t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 12) * u)
        elif kind == 2:
            f = rng.integers(3, 10)
            t = ((np.floor(xx * f) + np.floor(yy * f)) % 2).astype(float)
        else:
            coarse = rng.uniform(0, 1, (5, 5))
            rows = np.interp(yy[:, 0] * 4, np.arange(5), np.arange(5))
            t = np.array([np.interp(xx[0] * 4, np.arange(5), coarse[int(min(r, 3.999))]) for r in rows])
        return c1 * t[..., None] + c2 * (1 - t[..., None])

    @staticmethod
    def _shape(rng, yy, xx):
        """A boolean mask of one object covering about 5% to 33% of the image (12% on average)."""
        cy, cx = rng.uniform(0.3, 0.7, 2)
        r = rng.uniform(0.16, 0.3)
        angle = rng.uniform(0, 2 * np.pi)
        dy, dx = yy - cy, xx - cx
        u = np.cos(angle) * dx + np.sin(angle) * dy
        v = -np.sin(angle) * dx + np.cos(angle) * dy
        kind = rng.integers(4)
        if kind == 0:
            return (u / r) ** 2 + (v / (r * rng.uniform(0.5, 1))) ** 2 <= 1
        if kind == 1:
            return (np.abs(u) <= r) & (np.abs(v) <= r * rng.uniform(0.4, 1))
        theta, rho = np.arctan2(v, u), np.hypot(u, v)
        if kind == 2:  # triangle: inside three half-planes
            return np.max([u * np.cos(a) + v * np.sin(a) for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)], 0) <= r * 0.6
        k = rng.integers(3, 7)
        return rho <= r * (0.75 + 0.25 * np.cos(k * theta))


def folder_split(position, count):
    """The split of the image at `position` among a folder's `count` (sorted): of every ten,
    the fifth is for test and the tenth for validation; a folder of under ten gives its
    last image to validation and the one before it to test."""
    if count < 10:
        return {count - 1: "val", count - 2: "test"}.get(position, "train")
    return {9: "val", 4: "test"}.get(position % 10, "train")


class FolderDataset(torch.utils.data.Dataset):
    """Your own images: every image file under a folder (searched recursively, sorted), split
    by folder_split into train, validation and test images (disjoint).
    Masks are optional: with maskPath, the mask of IMAGES/a/b.jpg is MASKS/a/b.<png, ...>
    (white on the object), and scores are computed; without, scores are NaN."""

    def __init__(self, dataPath, sets="train", transform=None, sizex=128, maskPath=None):
        check_split(sets)
        if not os.path.isdir(dataPath):
            raise UserError("--dataroot %s: no such folder (--dataset folder: a folder of images)" % dataPath)
        files = image_files(dataPath)
        if len(files) < 3:
            raise UserError("--dataroot %s: found %d image files, need at least 3 (looked for %s)"
                            % (dataPath, len(files), ", ".join(IMAGE_EXTENSIONS)))
        self.files = [f for i, f in enumerate(files) if folder_split(i, len(files)) == sets]
        self.datapath, self.maskpath = dataPath, maskPath
        self.masks = [self._mask_file(f) for f in self.files] if maskPath else None
        self.has_masks = maskPath is not None
        self.transform = transform or resize_and_crop(sizex)

    def _mask_file(self, image_file):
        stem = os.path.splitext(image_file)[0]
        for ext in (".png",) + IMAGE_EXTENSIONS:
            path = os.path.join(self.maskpath, stem + ext)
            if os.path.exists(path):
                return path
        raise UserError("--maskroot %s: no mask for %s (expected %s.png, white on the object)"
                        % (self.maskpath, image_file, os.path.join(self.maskpath, stem)))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, idx):
        img = self.transform(open_image(os.path.join(self.datapath, self.files[idx]), "RGB"))
        if self.masks is None:
            return img * 2 - 1, torch.full_like(img[:1], float("nan"))
        mask = self.transform(open_image(self.masks[idx], "L"))
        return img * 2 - 1, (mask > .5).float()


def lfw_and_flowers(dataPath, sets="train", sizex=128):
    """LFW and Flowers mixed, without labels (the paper's two-class experiment): dataPath is
    'LFW_ROOT,FLOWERS_ROOT'. LFW's training images have no masks."""
    roots = dataPath.split(",")
    if len(roots) != 2:
        raise UserError("--dataroot %s: --dataset lfw+flowers takes two folders, LFW_ROOT,FLOWERS_ROOT" % dataPath)
    return torch.utils.data.ConcatDataset([LFWDataset(roots[0], sets, sizex=sizex),
                                           FlowersDataset(roots[1], sets, sizex=sizex)])


DATASETS = {"flowers": FlowersDataset, "cub": CUBDataset, "lfw": LFWDataset, "cmnist": CMNISTDataset,
            "synthetic": SyntheticDataset, "folder": FolderDataset, "lfw+flowers": lfw_and_flowers}


def needs_dataroot(name):
    """Whether the dataset `name` is read from --dataroot (all but the one generated in code)."""
    return name != "synthetic"


def make_dataset(name, root, split, sizex=128, maskroot=None):
    """The dataset `name` (a key of DATASETS) at `root`, one of its splits."""
    if name not in DATASETS:
        raise UserError("--dataset %s: unknown dataset (expected one of %s)" % (name, ", ".join(DATASETS)))
    if name == "folder":
        return FolderDataset(root, split, sizex=sizex, maskPath=maskroot)
    return DATASETS[name](root, split, sizex=sizex)


class InMemoryDataset(torch.utils.data.Dataset):
    """A dataset decoded, resized and cropped once, kept in memory (images as uint8), giving
    exactly the items of the original: for datasets read from disk at every epoch, where
    decoding JPEGs can starve a GPU."""

    def __init__(self, dataset, workers=0, batch_size=64):
        if isinstance(dataset, CMNISTDataset):
            raise UserError("--cacheData: cmnist draws new images at each access; it cannot be cached")
        # a private generator: filling the cache draws nothing from the run's random streams
        loader = Loader(dataset, batch_size=batch_size, num_workers=workers, generator=torch.Generator())
        images, masks = [], []
        for x, m in loader:
            images.append(torch.round((x + 1) / 2 * 255).to(torch.uint8))
            masks.append(m)
        self.images = torch.cat(images)
        masks = torch.cat(masks)
        binary = bool(((masks == 0) | (masks == 1)).all())
        self.masks = masks.to(torch.uint8) if binary else masks

    def nbytes(self):
        return self.images.nbytes + self.masks.nbytes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        # the same float operations as ToTensor and the datasets' `* 2 - 1`: identical values
        return self.images[idx].float().div(255) * 2 - 1, self.masks[idx].float()


# ----------------------------------------------------------------------------- batches for training

def make_loader(dataset, batch_size, workers, pin_memory=False):
    """Shuffled batches, the last incomplete one dropped, as every loader of the original.
    pin_memory: batches in page-locked memory, for asynchronous copies to a GPU."""
    return Loader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                  pin_memory=pin_memory)


class EpochSampler(torch.utils.data.Sampler):
    """torch's RandomSampler (same random draws: a seed from the global generator at the
    start of each epoch, then a permutation), which remembers the epoch's seed and can
    start an epoch part-way through, so that training resumes mid-epoch exactly."""

    def __init__(self, size):
        self.size = size
        self.seed = None
        self._resume_at = None

    def resume(self, seed, skip):
        self._resume_at = (seed, skip)

    def __iter__(self):
        if self._resume_at is not None:
            self.seed, skip = self._resume_at
            self._resume_at = None
        else:
            self.seed, skip = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        yield from torch.randperm(self.size, generator=generator).tolist()[skip:]

    def __len__(self):
        return self.size


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Batches of batch_size indices from sampler, the incomplete last one dropped; under
    torchrun each rank takes its own slice of every batch (batch_size is the global batch)."""

    def __init__(self, sampler, batch_size, rank=0, world=1):
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world

    def __iter__(self):
        share = self.batch_size // self.world
        batch = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch[self.rank * share:(self.rank + 1) * share]
                batch = []

    def __len__(self):
        return len(self.sampler) // self.batch_size


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def start_worker(worker_id, rank=0, world=1):
    """Every loader worker leaves SIGINT and SIGTERM to the main process (leave_stop_signals_to_parent).
    Under torchrun, the workers of each rank draw their own random numbers (a dataset that
    draws its images, such as cmnist, must not give every rank the same)."""
    leave_stop_signals_to_parent()
    if world > 1:
        seed = derived_seed(torch.initial_seed(), rank) % 2**32  # numpy's seeds are 32-bit
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def leave_stop_signals_to_parent():
    """In a loader worker: a terminal's Ctrl-C and a scheduler's SIGTERM reach every process
    of the job, and a worker they killed would make the main process fail inside its
    iteration; the main process stops the run cleanly, then ends its workers. So a worker
    ignores those signals, except from its parent (multiprocessing ends workers still
    running at exit with SIGTERM); it also ends when its parent dies (DataLoader's watchdog)."""
    if not hasattr(signal, "sigwaitinfo"):  # not on macOS or Windows: ignore them all
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # (blocked since birth: Loader) threads inherit it

    def wait_for_the_parents():
        while signal.sigwaitinfo(STOP_SIGNALS).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=wait_for_the_parents, daemon=True).start()


class Loader(torch.utils.data.DataLoader):
    """A DataLoader whose workers are born with SIGINT and SIGTERM blocked (start_worker then
    leaves them to the main process): a signal to the whole job while workers start would
    otherwise end them before they could ignore it. The main process gets the signal once
    its workers have started. Its workers start with start_worker unless told otherwise."""

    def __init__(self, *args, worker_init_fn=start_worker, **kwargs):
        super().__init__(*args, worker_init_fn=worker_init_fn, **kwargs)

    def _get_iterator(self):
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
            return super()._get_iterator()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class BatchStream:
    """Endless shuffled batches of a dataset, a new epoch whenever one ends, resumable."""

    def __init__(self, dataset, batch_size, workers, state=None, rank=0, world=1, pin_memory=False):
        self.sampler = EpochSampler(len(dataset))
        self.loader = Loader(
            dataset, batch_sampler=ShardedBatchSampler(self.sampler, batch_size, rank, world), num_workers=workers,
            worker_init_fn=functools.partial(start_worker, rank=rank, world=world),
            pin_memory=pin_memory)
        self.consumed = 0  # batches of the current epoch
        if state is not None:
            self.sampler.resume(state["epoch_seed"], state["batches_consumed"] * batch_size)
            self.consumed = state["batches_consumed"]
        self.batches = iter(self.loader)

    def __next__(self):
        try:
            batch = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            self.consumed = 0
            batch = next(self.batches)
        self.consumed += 1
        return batch

    def state_dict(self):
        return {"epoch_seed": self.sampler.seed, "batches_consumed": self.consumed}
