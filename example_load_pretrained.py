"""Load pretrained ReDO weights, then segment and redraw.

    # a sample grid out.png from a dataset (as the original script)
    python example_load_pretrained.py --statePath flowers_nets_state.tar.gz --dataroot DATA
    python example_load_pretrained.py --statePathM flowers_netM_state.pth --statePathX flowers_netX_state.pth --dataroot DATA --device cpu
    # accuracy and IoU of the mask extractor over a whole split
    python example_load_pretrained.py --statePathM flowers_netM_state.tar.gz --dataroot DATA --score --split test
    # a run of --dataset synthetic needs no --dataroot
    python example_load_pretrained.py --statePath out/best.pth --score --split test
    # masks of your own images, at their own size (only the masks are written)
    python example_load_pretrained.py --statePathM flowers_netM_state.tar.gz --images photos/ --outdir masks/
    # scores on a labelled folder of your own (masks: MASKS/<same path>.png, white on the object)
    python example_load_pretrained.py --statePath out/best.pth --dataset folder --dataroot photos --maskroot masks --score --split val
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
import torchvision.utils as vutils
from PIL import Image
from tqdm import tqdm

import datasets
import models
import scores
import utils
from utils import UserError

STATE_FLAGS = {"netEncM": "statePathM", "netGenX": "statePathX", "netRecZ": "statePathZ", "netDX": "statePathD"}
SHARED_SHAPES = ("sizex", "nx", "nz", "nMasks")  # what nets loaded from different files must agree on


def make_parser():
    p = argparse.ArgumentParser(description="Segment and redraw with pretrained ReDO weights.",
                                formatter_class=utils.HelpFormatter)
    p.add_argument('--batchSize', '--batch_size', dest='batch_size', type=int, default=40, metavar='BATCHSIZE',
                   help="number of images per batch (and in out.png); --batch_size: the original's name")
    p.add_argument('--device', default=None, help='cpu | cuda | cuda:N (default: cuda if available, else cpu)')
    p.add_argument('--statePath', default=None, help='weights of all nets in one file (.pth or .tar.gz)')
    p.add_argument('--statePathM', default=None, help='weights of the mask extractor (netEncM)')
    p.add_argument('--statePathX', default=None, help='weights of the region generators (netGenX)')
    p.add_argument('--statePathZ', default=None, help='weights of the noise reconstructor (netRecZ)')
    p.add_argument('--statePathD', default=None, help='weights of the discriminator (netDX)')
    p.add_argument('--dataroot', default=None,
                   help='path to the dataset the weights were trained on (none for synthetic)')
    p.add_argument('--dataset', default=None, help="dataset at --dataroot (default: the checkpoint's)")
    p.add_argument('--maskroot', default=None,
                   help='--dataset folder: folder of ground-truth masks, to --score your own labelled images')
    p.add_argument('--split', default=None, choices=datasets.SPLITS,
                   help='split to draw images from (default: test for lfw, train otherwise, as the original)')
    p.add_argument('--out', default='out.png', help='where to write the sample grid')
    p.add_argument('--score', action='store_true', help='print accuracy and IoU of netEncM over the whole split')
    p.add_argument('--images', nargs='+', default=None, help='your own images: files or folders')
    p.add_argument('--outdir', default='segmentations', help='where the masks of --images go')
    p.add_argument('--region', type=int, default=0, help='region whose masks are written for --images')
    p.add_argument('--redraw', action='store_true', help='also write one redrawn composite per region for --images')
    p.add_argument('--seed', type=int, default=None, help='seed for the shuffle and the noise')
    return p


# ----------------------------------------------------------------------------- loading

def load_given_nets(args, device):
    """The nets in the given files, in eval mode, and the options they were trained with."""
    nets, options = models.ReDONets(), None
    sources = []
    if args.statePath:
        state = utils.load_checkpoint(args.statePath, device)
        sources.append((args.statePath, state, [name for name in STATE_FLAGS if name in state]))
    for name, flag in STATE_FLAGS.items():
        path = getattr(args, flag)
        if path:
            sources.append((path, utils.load_checkpoint(path, device), [name]))
    if not sources:
        raise UserError("no weights given: use --statePath (all nets) or --statePathM / --statePathX / ...")
    for path, state, names in sources:
        check_same_shapes(options, state["options"], path)
        options = state["options"]
        for name, net in utils.load_nets(state, names, device, path).items():
            setattr(nets, name, net)
    return nets, options


def check_same_shapes(opt, other, path):
    if opt is None:
        return
    utils.check_same_options(other, opt, SHARED_SHAPES, "other",
                             "%s: built for another configuration than the other weights: " % path)


def require(nets, name, purpose):
    if getattr(nets, name) is None:
        raise UserError("%s needs the %s (%s): give --%s, or --statePath with a file that holds it"
                        % (purpose, name, {"netEncM": "mask extractor", "netGenX": "region generators"}[name],
                           STATE_FLAGS[name]))


# ----------------------------------------------------------------------------- a dataset

def dataset_split(name, args, opt):
    split = args.split or ("test" if name == "lfw" else "train")
    return datasets.make_dataset(name, args.dataroot, split, opt.sizex, args.maskroot), split


@torch.no_grad()
def save_sample_grid(nets, loader, opt, device, path):
    """One row per image: input, ground truth, soft mask of region 0, binarized mask of
    region 1, then one redraw per region (as the original); without netGenX, no redraws."""
    xData, mData = next(iter(loader))
    xData, mData = xData.to(device), mData.to(device)
    mPred = nets.netEncM(xData)
    columns = [xData * .5 + .5, mData.expand_as(xData), mPred[:, 0:1].expand_as(xData),
               (mPred[:, 1:2] >= .5).float().expand_as(xData)]
    if nets.netGenX is not None:
        z = models.draw_noise(xData.size(0), opt.nMasks, opt.nz, device)
        _, composites = models.redraw(nets.netGenX, xData, mPred, z)
        columns += [composites[:, k] * .5 + .5 for k in range(opt.nMasks)]
    grid = torch.stack(columns, 1).flatten(0, 1)
    utils.atomic_write(path, lambda f: vutils.save_image(grid, f, format="png", normalize=True,
                                                         value_range=(0, 1), nrow=len(columns)))
    return len(columns)


# ----------------------------------------------------------------------------- your own images

def list_images(paths):
    """Image files named on the command line, and those in the given folders (recursively),
    each with the name its outputs get (its path relative to the folder, no extension)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += [(os.path.join(path, rel), os.path.splitext(rel)[0]) for rel in datasets.image_files(path)]
        elif os.path.isfile(path):
            found.append((path, os.path.splitext(os.path.basename(path))[0]))
        else:
            raise UserError("--images %s: no such file or folder" % path)
    if not found:
        raise UserError("--images %s: no image files found (looked for %s)"
                        % (" ".join(paths), ", ".join(datasets.IMAGE_EXTENSIONS)))
    return found


def to_network_input(image, sizex):
    """The whole image resized to sizex x sizex (the aspect ratio is not kept, so that the
    mask covers every pixel), in [-1, 1]."""
    return TF.to_tensor(image.resize((sizex, sizex), resample=Image.BICUBIC)) * 2 - 1


def save_png(tensor, path):
    """tensor (1 or 3, H, W) in [0, 1] -> an 8-bit grayscale or RGB PNG, atomically."""
    array = (tensor.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).squeeze(2).cpu().numpy()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    utils.atomic_write(path, lambda f: Image.fromarray(array).save(f, format="png"))


@torch.no_grad()
def segment_own_images(nets, opt, args, device):
    """For each image: NAME_mask.png (binary, 255 on the region), NAME_soft.png (soft mask)
    and with --redraw NAME_redraw<k>.png, all at the image's own size."""
    files = list_images(args.images)
    written, skipped = 0, []
    for start in tqdm(range(0, len(files), args.batch_size), unit="batch", disable=len(files) <= args.batch_size):
        images = []
        for path, name in files[start:start + args.batch_size]:
            try:
                images.append((datasets.open_image(path, "RGB"), name))
            except UserError as e:
                skipped.append(str(e))
                utils.warn("skipped: %s" % e)
        if not images:
            continue
        x = torch.stack([to_network_input(image, opt.sizex) for image, _ in images]).to(device)
        masks = nets.netEncM(x)
        if args.redraw:
            regions = nets.netGenX(masks, models.draw_noise(x.size(0), opt.nMasks, opt.nz, device))
        for i, (image, name) in enumerate(images):
            size = (image.height, image.width)
            soft = F.interpolate(masks[i:i + 1], size=size, mode="bilinear", align_corners=False)[0]
            base = os.path.join(args.outdir, name)
            save_png((scores.most_likely_region(soft, 0) == args.region).float()[None], base + "_mask.png")
            save_png(soft[args.region:args.region + 1].clamp(0, 1), base + "_soft.png")
            if args.redraw:
                full = TF.to_tensor(image).to(device) * 2 - 1
                drawn = F.interpolate(regions[i], size=size, mode="bilinear", align_corners=False)
                for k in range(opt.nMasks):
                    composite = drawn[k] + (1 - soft[k:k + 1]) * full
                    save_png((composite * .5 + .5).clamp(0, 1), base + "_redraw%d.png" % k)
            written += 1
    return written, skipped


# ----------------------------------------------------------------------------- main

def run(args):
    device = utils.resolve_device(args.device)
    if args.batch_size < 1:
        raise UserError("--batchSize %d: expected a positive number" % args.batch_size)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    nets, opt = load_given_nets(args, device)
    dataset_name = args.dataset or opt.dataset
    use_dataset = args.dataroot is not None or not datasets.needs_dataroot(dataset_name)
    if not use_dataset and not args.images:
        raise UserError("nothing to do: give --dataroot (images of the dataset) and/or --images (your own)")
    loaded = [name for name, _ in nets.items()]
    print("loaded %s on %s" % (", ".join(loaded), device))
    require(nets, "netEncM", "segmenting")
    if not 0 <= args.region < opt.nMasks:
        raise UserError("--region %d: these weights have regions 0 to %d" % (args.region, opt.nMasks - 1))
    if use_dataset and (args.score or not args.images):
        dataset, split = dataset_split(dataset_name, args, opt)
        if len(dataset) == 0:
            raise UserError("--dataroot %s: the %s split of %s is empty" % (args.dataroot, split, dataset_name))
    if use_dataset and not args.images:  # with --images, only their masks are written
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
        columns = save_sample_grid(nets, loader, opt, device, args.out)
        print("wrote %s: %d images of the %s split of %s, %d columns (input, ground truth, soft mask, "
              "binarized mask%s)" % (os.path.abspath(args.out), min(args.batch_size, len(dataset)), split,
                                     dataset_name, columns,
                                     ", one redraw per region" if nets.netGenX is not None else ""))
        if nets.netGenX is None:
            print("no redraws: they need the region generators (netGenX): give --statePathX, or --statePath "
                  "with a file that holds them")
    if args.score and not use_dataset:
        raise UserError("--score needs --dataroot (a dataset with ground-truth masks)")
    if args.score:
        in_order = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
        acc, iou, _, _ = scores.evaluate(nets.netEncM, in_order, device, desc="scoring")
        print("%s split of %s (%d images): accuracy %.4f IoU %.4f%s"
              % (split, dataset_name, len(dataset), acc, iou,
                 " (no ground-truth masks%s)" % (": give --maskroot" if dataset_name == "folder" else "")
                 if math.isnan(iou) else ""))
    if args.images:
        if args.redraw:
            require(nets, "netGenX", "--redraw")
        written, skipped = segment_own_images(nets, opt, args, device)
        print("wrote the masks of %d images to %s%s" % (written, os.path.abspath(args.outdir),
                                                       " (%d skipped, named above)" % len(skipped) if skipped else ""))
        if skipped:
            raise UserError("%d of the --images could not be read" % len(skipped))


def main(argv=None):
    try:
        run(make_parser().parse_args(argv))
    except UserError as e:
        sys.exit("error: %s" % utils.user_error_message(e))


if __name__ == "__main__":
    main()
