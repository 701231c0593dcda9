"""How a checkpoint is judged: with labels, the accuracy and IoU of its masks (the
original's evaluate()) and the collapse test of --autoRestart; without labels, the
label-free score that chooses best_unsupervised.pth and tells --earlyRestart a start gone
wrong (README, "Choosing a checkpoint without labels")."""
import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import models
from utils import UserError, eval_mode


# ----------------------------------------------------------------------------- with labels

def foreground_assignments(nMasks):
    """Every way to call some of the regions foreground and the others background (not all, not none)."""
    return [subset for r in range(1, nMasks) for subset in itertools.combinations(range(nMasks), r)]


def most_likely_region(masks, dim=1):
    """Each pixel's region: the index of its largest mask along `dim`, the first on ties and a
    NaN counted largest, as argmax() gives it; max() gives the same indices some 30 times
    faster on the CPU, where argmax() over the few regions of a (B, K, H, W) batch is slow
    (torch 2.14; README, Speed)."""
    return masks.max(dim).indices


def segmentation_scores(mPred, mData):
    """Per-image accuracy and IoU of soft masks mPred (B, K, H, W) against binary ground truth
    mData (B, 1, H, W), each the best over the ways of assigning regions to the foreground.

    A pixel belongs to the region with the largest mask (the first on ties). For K = 2 the
    two assignments are {region 0} (mPred[:, 0] >= .5) and {region 1} (mPred[:, 0] < .5):
    the original's score exactly. IoU is NaN for an image where both masks are empty.
    """
    region = most_likely_region(mPred).unsqueeze(1)
    accs, ious = [], []
    for subset in foreground_assignments(mPred.size(1)):
        pred = torch.isin(region, torch.tensor(subset, device=region.device)).float()
        accs.append((pred == mData).float().mean((-1, -2)))
        ious.append(((pred + mData) == 2).float().sum((-1, -2)) / ((pred + mData) >= 1).float().sum((-1, -2)))
    return torch.stack(accs).amax(0).squeeze(1), torch.stack(ious).amax(0).squeeze(1)


class SplitScores(NamedTuple):
    acc: float
    iou: float
    min_region_size: float  # of the last batch: what --autoRestart tests, as the original
    region_sizes: list  # each region's mean soft-mask size over the whole split


def evaluate(netEncM, loader, device, desc=None):
    """Accuracy and IoU of netEncM over a loader of (image, mask) batches, as the original:
    means over batches of per-batch means; min_region_size of the last batch; and each
    region's mean size over all batches. Images without ground truth (NaN masks: LFW's
    train split) are left out of the means; a split with none has NaN scores. desc: a
    progress bar with this label."""
    sumAcc, sumIoU, nScored, mPred, sizes = 0.0, 0.0, 0, None, []
    with eval_mode(netEncM), torch.inference_mode():
        for xLoad, mLoad in tqdm(loader, desc=desc, leave=False, disable=desc is None):
            mData = mLoad.to(device, non_blocking=True)
            mPred = netEncM(xLoad.to(device, non_blocking=True))
            sizes.append(mPred.mean((0, 2, 3)))
            known = ~mData.isnan().flatten(1).any(1)
            if known.any():
                acc, iou = segmentation_scores(mPred[known], mData[known])
                sumAcc += acc.mean().item()
                sumIoU += iou.mean().item()
                nScored += 1
    if mPred is None:
        raise UserError("evaluation got no batch: the split is empty or smaller than one batch")
    region_sizes = torch.stack(sizes).mean(0).tolist()
    if nScored == 0:
        return SplitScores(float("nan"), float("nan"), min_region_size(mPred), region_sizes)
    return SplitScores(sumAcc / nScored, sumIoU / nScored, min_region_size(mPred), region_sizes)


def min_region_size(mPred):
    """The smallest average soft-mask size of a region: near 0 when training has collapsed."""
    return mPred.mean((0, 2, 3)).min().item()


def has_collapsed(min_region_sizes, threshold):
    """The --autoRestart test, as the original: the smallest region is under `threshold`
    (strictly) on every split scored (train and val), not on one only: a batch of small
    objects is not a collapse."""
    return all(size < threshold for size in min_region_sizes)


# ----------------------------------------------------------------------------- without labels

LABEL_FREE_IMAGES = 64  # the first validation images, scored without labels at each checkpoint
LABEL_FREE_BATCH = 32  # images per forward pass while scoring them (no effect on the score)


def label_free_inputs(valset, nMasks, nz):
    """The images the label-free score is computed on, and the fixed noise that redraws them
    (from a generator of its own: the run's random streams are not touched)."""
    n = min(LABEL_FREE_IMAGES, len(valset))
    images = torch.stack([valset[i][0] for i in range(n)])
    noise = models.draw_noise(n, nMasks, nz, generator=torch.Generator().manual_seed(0))
    return images, noise


class LabelFreeScores(NamedTuple):
    """What the nets and the images say of netEncM's masks, without labels (see label_free_scores)."""
    score: float
    refound: float
    edges: float
    realism: float
    binariness: float
    min_region_size: float


def label_free_scores(nets, images, z, batch_size=LABEL_FREE_BATCH):
    """Label-free quality of the masks of netEncM on `images` (N, C, H, W), in eval mode,
    drawing no random number. Each region of each image is redrawn whole (the masks made
    hard: each pixel in its most likely region) with the fixed noise z (N, nMasks, nz, 1, 1),
    and
    - refound: how well netEncM finds the same regions again in the composites: the mean
      over regions of their IoU (pixels of the region in the image and in the composite,
      over every composite; 0 for a region that is empty in both, so a collapse scores
      1/nMasks at most),
    - edges: how much stronger the images' colour edges are on the boundaries between the
      hard regions than on average (1: boundaries placed at random; 0: no boundary),
    - score: refound * edges, the one that chooses best_unsupervised.pth,
    - realism: how often netDX ranks a composite above a real image (over all pairs; 0.5:
      it cannot tell them apart),
    - binariness: how far the soft masks are from uniform (0) towards hard (1),
    - min_region_size: the smallest region's mean size.
    README, "Choosing a checkpoint without labels", says why."""
    device = next(nets.netEncM.parameters()).device
    real, fake, binary, sizes = [], [], [], []
    intersection = union = 0
    edge_on_boundaries = boundary_pixels = edge_everywhere = 0
    with eval_mode(nets.netEncM, nets.netGenX, nets.netDX), torch.inference_mode():
        for start in range(0, images.size(0), batch_size):
            x = images[start:start + batch_size].to(device)
            masks = nets.netEncM(x)
            k = masks.size(1)
            region = most_likely_region(masks)  # (B, H, W)
            regions = F.one_hot(region, k)  # (B, H, W, K)
            _, composites = models.redraw(nets.netGenX, x, regions.permute(0, 3, 1, 2).to(x.dtype),
                                          z[start:start + batch_size].to(device))
            real.append(nets.netDX(x).flatten())
            fake.append(nets.netDX(composites.flatten(0, 1)).flatten())
            regions = regions.unsqueeze(1).bool()  # (B, 1, H, W, K): against each composite
            found = F.one_hot(most_likely_region(nets.netEncM(composites.flatten(0, 1))), k).bool()
            found = found.view(x.size(0), k, *x.shape[2:], k)  # (B, composite, H, W, K)
            intersection = intersection + (regions & found).sum((0, 1, 2, 3))
            union = union + (regions | found).sum((0, 1, 2, 3))
            binary.append(masks.max(1).values.mean((1, 2)))
            sizes.append(masks.mean((2, 3)))
            edge, boundary = colour_edges(x.float()), region_boundaries(region)
            edge_on_boundaries = edge_on_boundaries + (edge * boundary).sum()
            boundary_pixels = boundary_pixels + boundary.sum()
            edge_everywhere = edge_everywhere + edge.mean((1, 2)).sum()
    real, fake = torch.cat(real).float(), torch.cat(fake).float()
    realism = ((fake[:, None] > real[None]).float().mean() + 0.5 * (fake[:, None] == real[None]).float().mean()).item()
    refound = (intersection / union.clamp(min=1)).mean().item()
    binariness = (torch.cat(binary).mean().item() - 1 / k) / (1 - 1 / k)
    min_size = torch.cat(sizes).mean(0).min().item()
    mean_edge = edge_everywhere / images.size(0)
    edges = (edge_on_boundaries / boundary_pixels.clamp(min=1) / mean_edge).item() if mean_edge > 0 else 0.0
    return LabelFreeScores(refound * edges, refound, edges, realism, binariness, min_size)


def colour_edges(x):
    """Colour-gradient magnitude of images (B, C, H, W) by forward differences: (B, H-1, W-1)."""
    down = x[:, :, 1:, :-1] - x[:, :, :-1, :-1]
    right = x[:, :, :-1, 1:] - x[:, :, :-1, :-1]
    return (down.square() + right.square()).sum(1).sqrt()


def region_boundaries(region):
    """Pixels of a region map (B, H, W) whose lower or right neighbour is in another region,
    on the grid of colour_edges: (B, H-1, W-1)."""
    here = region[:, :-1, :-1]
    return (region[:, 1:, :-1] != here) | (region[:, :-1, 1:] != here)
