"""Train ReDO: a mask extractor learns to segment because redrawn regions must fool a discriminator.

    python train.py --dataset flowers --nfX 32 --useSelfAttG --useSelfAttD --outf OUT --dataroot DATA --clean
"""
import argparse
import contextlib
import ctypes
import glob
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision.utils as vutils
from tqdm import tqdm

import augment
import datasets
import models
import utils
from utils import UserError


# ----------------------------------------------------------------------------- the training iteration

# each optimizer: the net it updates, the flag of its learning rate, of its weight decay
OPTIMIZER_FLAGS = {
    "optimizerEncM": ("netEncM", "lrM", "wdecay"),
    "optimizerGenX": ("netGenX", "lrG", None),
    "optimizerDX": ("netDX", "lrD", None),
    "optimizerRecZ": ("netRecZ", "lrZ", None),
}


def make_optimizers(nets, opt, fused=True):
    """Adam with betas (0, 0.9) for each net; weight decay on the mask extractor only.
    Fused: one kernel per step instead of several per parameter (the same formula); the
    original's is unfused (fused=False)."""
    optimizers = {}
    for name, (net, lr, wdecay) in OPTIMIZER_FLAGS.items():
        if getattr(nets, net) is not None:
            optimizers[name] = torch.optim.Adam(getattr(nets, net).parameters(), betas=(0.0, 0.9), fused=fused,
                                                lr=getattr(opt, lr), weight_decay=getattr(opt, wdecay) if wdecay else 0)
    return optimizers


def load_optimizer_state(optimizer, state):
    """Load an Adam state saved by any implementation (the original's, which loops over
    parameters) into our fused Adam. The saved learning rate and weight decay replace the
    optimizer's, as torch's load_state_dict does in the original."""
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError("the saved optimizer state has %d parameter groups, not %d"
                         % (len(state["param_groups"]), len(optimizer.param_groups)))
    groups = [dict(saved, fused=ours["fused"], foreach=ours["foreach"])
              for saved, ours in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict(dict(state, param_groups=groups))


def overridden_flags(name, state, opt):
    """The flags of optimizer `name` whose value on the command line differs from the one
    saved in its state (which is used): ["--lrM 2e-05 (saved: 0.0001)", ...]."""
    _, lr, wdecay = OPTIMIZER_FLAGS[name]
    saved = state["param_groups"][0]
    return ["--%s %s (saved: %s)" % (flag, getattr(opt, flag), saved[key])
            for flag, key in ((lr, "lr"), (wdecay, "weight_decay"))
            if flag and getattr(opt, flag) != saved[key]]


class RealAndFake(torch.nn.Module):
    """netDX on real images, then on composites: two calls, as the original (each runs one
    spectral-norm power iteration), in one forward, as DistributedDataParallel needs."""

    def __init__(self, netDX):
        super().__init__()
        self.netDX = netDX

    def forward(self, xReal, xFake):
        return self.netDX(xReal), self.netDX(xFake)


@dataclass
class StepModules:
    """What the training steps call: the nets themselves, or under torchrun their
    DistributedDataParallel wrappers (netDX stays bare for the generator step, where its
    gradients are not wanted)."""
    netEncM: torch.nn.Module
    netGenX: torch.nn.Module
    netDX: torch.nn.Module
    netRecZ: Optional[torch.nn.Module]
    realAndFake: torch.nn.Module

    @classmethod
    def of(cls, nets, wrap=lambda module: module):
        return cls(netEncM=wrap(nets.netEncM), netGenX=wrap(nets.netGenX), netDX=nets.netDX,
                   netRecZ=wrap(nets.netRecZ) if nets.netRecZ is not None else None,
                   realAndFake=wrap(RealAndFake(nets.netDX)))


def redraw_all_regions(modules, xData, zData):
    """Masks of xData, the redrawn regions and the composites (one per region), the latter
    flattened to (B * nMasks, C, H, W) for the discriminator."""
    mEnc = modules.netEncM(xData)
    hGen, xGen = models.redraw(modules.netGenX, xData, mEnc, zData)
    return mEnc, hGen, xGen.flatten(0, 1)


@contextlib.contextmanager
def frozen(net):
    """No parameter gradients for net inside the block (gradients still flow through it)."""
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def generator_step(modules, optimizers, xData, zData, wrecZ, transform=None):
    """Update the mask extractor, the generators and the noise reconstructor so that every
    composite looks real to netDX and z can be recovered from the redrawn regions. transform:
    what netDX sees of the composites (--diffAugment), when not the composites themselves."""
    _, hGen, xGen = redraw_all_regions(modules, xData, zData)
    with frozen(modules.netDX):  # its gradients would be discarded: the D step starts from zero
        lossG = -modules.netDX(transform(xGen) if transform else xGen).mean()
    losses = {}
    if modules.netRecZ is not None:
        err_recZ = F.mse_loss(modules.netRecZ(hGen.sum(1)), zData)
        lossG = lossG + wrecZ * err_recZ
        losses["err_recZ"] = err_recZ.detach()
    lossG.backward()
    optimizers["optimizerEncM"].step()
    optimizers["optimizerGenX"].step()
    if modules.netRecZ is not None:
        optimizers["optimizerRecZ"].step()
    losses["lossG"] = lossG.detach()
    return losses


def discriminator_step(modules, optimizers, xData, xReal, zData, transform=None):
    """Hinge-loss update of netDX on real images and on composites recomputed (without
    gradient) by the just-updated nets. transform: the same transform of each real image and
    of the composites of the image in its place (--diffAugment)."""
    modules.netDX.zero_grad()
    with torch.no_grad():
        _, _, xGen = redraw_all_regions(modules, xData, zData)
    if transform:
        xReal, xGen = transform(xReal), transform(xGen)
    dReal, dFake = modules.realAndFake(xReal, xGen)
    lossD = F.relu(1 - dReal).mean() + F.relu(1 + dFake).mean()
    lossD.backward()
    optimizers["optimizerDX"].step()
    return {"lossD": lossD.detach()}


def training_iteration(nets, optimizers, xData, xReal, zData, opt, iteration, modules=None,
                       augmentations=(None, None)):
    """One ReDO iteration: a generator step every gStepFreq iterations, then a discriminator
    step every dStepFreq iterations. Returns the losses of the steps taken. `modules`: what
    the steps call, when not the nets themselves (torchrun); `augmentations`: the transforms
    of what netDX sees in each step (--diffAugment)."""
    modules = modules or StepModules.of(nets)
    nets.zero_grad()
    nets.train()
    losses = {}
    if iteration % opt.gStepFreq == 0:
        losses.update(generator_step(modules, optimizers, xData, zData, opt.wrecZ, augmentations[0]))
    if iteration % opt.dStepFreq == 0:
        losses.update(discriminator_step(modules, optimizers, xData, xReal, zData, augmentations[1]))
    return losses


# ----------------------------------------------------------------------------- options

EARLY_RESTARTS = 5  # at most, in a run: each costs a checkpoint period
ROLLBACK_SEED_STRIDE = 1000003  # rollback k reseeds with --manualSeed + k * this prime: seeds no run shares


def make_parser():
    p = argparse.ArgumentParser(description="Train ReDO (unsupervised object segmentation by redrawing).",
                                formatter_class=utils.HelpFormatter)
    p.add_argument('--dataset', default="flowers",
                   help='flowers | cub | lfw | cmnist | synthetic (built in, no download) | folder (your images) '
                        '| lfw+flowers (--dataroot LFW_ROOT,FLOWERS_ROOT)')
    p.add_argument('--dataroot', default='./data', help='path to dataset')
    p.add_argument('--maskroot', default=None, help='--dataset folder: folder of ground-truth masks (optional)')
    p.add_argument('--nx', type=int, default=3, help='number of channels of the input image')
    p.add_argument('--sizex', type=int, default=128, help='size of the input image (only 128 is supported)')
    p.add_argument('--nz', type=int, default=32, help='size of the latent z vector')
    p.add_argument('--nMasks', type=int, default=2, help='number of masks')
    p.add_argument('--nResM', type=int, default=3, help='number of residual blocks in netM')
    p.add_argument('--nf', type=int, default=64, help='base number of filters for conv nets')
    p.add_argument('--nfD', type=int, default=None, help='nf for netD (default: --nf)')
    p.add_argument('--nfX', type=int, default=None, help='nf for netX (default: --nf)')
    p.add_argument('--nfM', type=int, default=None, help='nf for netM (default: --nf)')
    p.add_argument('--nfZ', type=int, default=None, help='nf for netZ (default: --nf)')
    p.add_argument('--useSelfAttD', action='store_true', help='use self attention for D')
    p.add_argument('--useSelfAttG', action='store_true', help='use self attention for G')
    p.add_argument('--workers', type=int, default=4, help='number of data loading workers')
    p.add_argument('--batchSize', type=int, default=20, help='input batch size')
    p.add_argument('--nTest', type=int, default=5, help='number of test images shown in the sample grids')
    p.add_argument('--nTrainScore', type=int, default=0,
                   help='score only the first N training images at each checkpoint (train.dat, the collapse '
                        'test), not the whole split as the original (0): scoring is a third of a short '
                        "period's time")
    p.add_argument('--nIteration', type=int, default=50000, help='number of iterations')
    p.add_argument('--initOrthoGain', type=float, default=.8, help='gain for the orthogonal initialization')
    p.add_argument('--lrG', type=float, default=1e-4, help='learning rate of the region generators (netX)')
    p.add_argument('--lrM', type=float, default=1e-5, help='learning rate of the mask extractor (netM)')
    p.add_argument('--lrD', type=float, default=1e-4, help='learning rate of the discriminator (netD)')
    p.add_argument('--lrZ', type=float, default=1e-4, help='learning rate of the noise reconstructor (netZ)')
    p.add_argument('--gStepFreq', type=int, default=1, help='update G every x iterations')
    p.add_argument('--dStepFreq', type=int, default=1, help='update D every x iterations')
    p.add_argument('--temperature', type=float, default=1, help='softmax temperature')
    p.add_argument('--wdecay', type=float, default=1e-4, help='weight decay of the mask extractor')
    p.add_argument('--wrecZ', type=float, default=5, help='weight for z reconstruction (0: no netRecZ)')
    p.add_argument('--outf', default='.', help='folder to output images and model checkpoints')
    p.add_argument('--checkpointFreq', type=int, default=500, help='frequency of checkpoints')
    p.add_argument('--iteration', type=int, default=0, help='iteration to load (to resume training)')
    p.add_argument('--manualSeed', type=int, help='manual seed (default: drawn at random, and saved)')
    p.add_argument('--resume', nargs='?', const=True, default=False, type=resume_mode,
                   help='resume from the last checkpoint in --outf; "--resume auto": continue the run in --outf '
                        'if it has a checkpoint, else start it (one command for a scheduler that requeues it)')
    p.add_argument('--overwrite', action='store_true',
                   help="start a new run in an --outf that holds another run's files, removing them first")
    p.add_argument('--clean', action=argparse.BooleanOptionalAction, default=False,
                   help='delete the previous checkpoint when saving one (kept by --resume; --no-clean to stop)')
    p.add_argument('--silent', action='store_true', help='silent execution')
    p.add_argument('--autoRestart', type=float, default=0,
                   help='restart training if the ratio "size of region" / "size of image" is strictly '
                        'smaller than x on train and val at a checkpoint (collapse detected)')
    p.add_argument('--rollback', type=int, default=0,
                   help='after a collapse (the --autoRestart test, at any iteration), go back to the newest '
                        'checkpoint (one further back for each rollback before the run gets past the collapse) '
                        'and go on with fresh noise and data order, at most this many times; then '
                        '--autoRestart as the original. --clean keeps this many checkpoints more')
    p.add_argument('--earlyRestart', type=float, default=0,
                   help='restart from scratch when the found-again score (label-free) at the first checkpoint of '
                        'a start is under x (netEncM does not find again the regions it had redrawn: a start '
                        'gone wrong), at most %d times (0: off)' % EARLY_RESTARTS)
    p.add_argument('--device', default=None, help='cpu | cuda | cuda:N (default: cuda if available, else cpu)')
    p.add_argument('--amp', default='none', choices=['none', 'bf16'],
                   help='mixed precision for the training iterations: bf16 autocast (CPU and CUDA)')
    p.add_argument('--compile', action='store_true', help='compile the nets with torch.compile: minutes of compiling, for long GPU runs (README, Speed)')
    p.add_argument('--tensorboard', action='store_true',
                   help='also write the statistics and sample grids for TensorBoard in OUTF/tensorboard '
                        '(pip install tensorboard)')
    p.add_argument('--cacheData', action='store_true',
                   help='decode and resize the dataset once and keep it in memory (same images)')
    p.add_argument('--skipOrthoInitSN', action='store_true',
                   help="leave spectral-norm layers at PyTorch's default init, as the original's GPU runs "
                        "did (see README)")
    p.add_argument('--hflip', action='store_true', help='flip half of the training images left to right, at random')
    p.add_argument('--diffAugment', type=augment.policy, default=(), metavar='T1,T2',
                   help="show netDX real images and composites through the same random transforms, among %s "
                        "(DiffAugment)" % ", ".join(augment.POLICIES))
    return p


def resume_mode(text):
    if text != "auto":
        raise argparse.ArgumentTypeError("expected nothing (the newest checkpoint) or 'auto' (continue or start)")
    return text


RESUME_OVERRIDES = ("clean", "silent", "outf", "device", "workers", "nIteration")
"""What --resume takes from the command line: --silent and --outf always (as the original),
the others when given."""


def explicit_flags(argv=None):
    """The options given on the command line (not left at their defaults)."""
    parser = make_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def complete_options(opt):
    """Options saved before a flag existed (by the original, or by an earlier version of
    this project) get that flag's default, once, when they are loaded."""
    for action in make_parser()._actions:
        if action.dest != "help" and action.dest not in opt:
            setattr(opt, action.dest, action.default)
    return opt


def resolve_options(opt, explicit=()):
    """The run's options and the checkpoint it starts from, (path, state) or None.

    --resume takes the options saved in the newest complete checkpoint of --outf, except
    those of RESUME_OVERRIDES. --iteration N starts from OUTF/state_N.pth with the command
    line's options.
    """
    start = None
    if opt.overwrite and opt.resume:
        raise UserError("--overwrite starts a new run in --outf: it cannot go with --resume")
    if opt.resume is True or (opt.resume == "auto" and checkpoint_files(opt.outf)):
        path, state = latest_checkpoint(opt.outf, "cpu")
        saved = complete_options(state["options"])
        given = sorted(explicit - set(RESUME_OVERRIDES) - {"resume", "iteration", "overwrite"})
        if opt.resume == "auto":
            check_same_command(saved, opt, given, path)
        elif given:
            utils.warn("--resume: continuing with the run's saved options; ignoring --%s" % ", --".join(given))
        if "clean" in explicit and opt.clean != saved.clean:
            utils.warn("--resume: %s" % ("--clean: from now on only the newest checkpoint is kept" if opt.clean else
                                        "--no-clean: from now on every checkpoint is kept (the run had --clean)"))
        for name in RESUME_OVERRIDES:
            if name in explicit or name in ("silent", "outf"):
                setattr(saved, name, getattr(opt, name))
        saved.resume, saved.overwrite = True, False
        opt, start = saved, (path, state)
    if "bestValIoU" not in opt:
        opt.bestValIoU = 0
    for name in ("rollbacks",  # how many --rollback the run has used,
                 "rollbacksInARow",  # how many since the run last got past the iteration it collapsed at
                 "collapsedAt",
                 "earlyRestarts"):  # how many --earlyRestart the run has used
        if name not in opt:
            setattr(opt, name, 0)
    if "bestLabelFree" not in opt:  # the best label-free score, that of best_unsupervised.pth
        opt.bestLabelFree = -1.0
    for name in ("nfD", "nfX", "nfM", "nfZ"):
        if getattr(opt, name) is None:
            setattr(opt, name, opt.nf)
    if opt.manualSeed is None:
        opt.manualSeed = random.randint(1, 10000)
    opt.device = utils.resolve_device(opt.device)
    check_options(opt)
    if start is None and opt.iteration == 0:
        check_no_other_run(opt)
    if start is None and opt.iteration > 0:
        path = state_path(opt, opt.iteration)
        if not os.path.isfile(path):
            raise UserError("--iteration %d: %s does not exist" % (opt.iteration, path))
        start = (path, utils.load_checkpoint(path, "cpu"))
    return opt, start


def check_same_command(saved, opt, given, path):
    """--resume auto continues only the run its own command started: a flag of this command
    that differs from the run's means another run's folder."""
    differences = utils.option_differences(opt, saved, given, "the run")
    if differences:
        raise UserError("--resume auto: %s belongs to a run of another configuration: %s; continue it with --resume "
                        "(its own options), or use another --outf" % (path, ", ".join(differences)))


RUN_FILES = ("state_[0-9]*.pth", "options.pth", "best.pth", "best_unsupervised.pth", "train.dat", "val.dat",
             "stats.jsonl", "curves.png", "out_[0-9]*.png", "tensorboard")
"""What a run writes in --outf (README, What a run writes); the first four are checkpoints."""


def run_files(outf, patterns=RUN_FILES):
    return sorted({os.path.basename(path) for pattern in patterns
                   for path in glob.glob(os.path.join(glob.escape(outf), pattern))})


def check_no_other_run(opt):
    """A new run never destroys another: into an --outf that holds a run's files it starts
    only with --overwrite (train() removes them), or, with --resume auto, when none of them
    is a checkpoint (what a start stopped before its first checkpoint left)."""
    found = run_files(opt.outf, RUN_FILES[:4] if opt.resume == "auto" else RUN_FILES)
    if found and not opt.overwrite:
        listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise UserError("--outf %s holds another run (%s): continue it with --resume, start over with --overwrite "
                        "(removes that run's files), or choose another --outf" % (opt.outf, listed))


def remove_run_files(outf):
    for name in run_files(outf):
        path = os.path.join(outf, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def check_options(opt):
    if opt.dataset not in datasets.DATASETS:
        raise UserError("--dataset %s: unknown dataset (expected one of %s)" % (opt.dataset, ", ".join(datasets.DATASETS)))
    if opt.sizex != models.SUPPORTED_SIZEX:
        raise UserError("--sizex %d: only 128 is supported (the networks are built for 128x128 images)" % opt.sizex)
    if opt.nMasks < 2:
        raise UserError("--nMasks %d: ReDO needs at least 2 regions" % opt.nMasks)
    for name in ("nx", "nz", "nResM", "nf", "nfD", "nfX", "nfM", "nfZ", "batchSize", "nTest", "checkpointFreq",
                 "gStepFreq", "dStepFreq"):
        if getattr(opt, name) < (0 if name == "nResM" else 1):
            raise UserError("--%s %s: expected a positive number" % (name, getattr(opt, name)))
    if opt.nx != 3:
        raise UserError("--nx %d: the datasets give 3-channel images" % opt.nx)
    if opt.nfM < 4:
        raise UserError("--nfM %d: the mask extractor needs at least 4 filters (it uses nfM/4)" % opt.nfM)
    if opt.workers < 0:
        raise UserError("--workers %d: expected 0 or more" % opt.workers)
    if opt.nTrainScore and opt.nTrainScore < opt.batchSize:
        raise UserError("--nTrainScore %d: expected 0 (the whole training split) or at least --batchSize (%d) "
                        "images" % (opt.nTrainScore, opt.batchSize))
    if opt.temperature <= 0:
        raise UserError("--temperature %s: expected a positive number" % opt.temperature)
    if opt.wrecZ < 0:
        raise UserError("--wrecZ %s: expected 0 (no noise reconstructor) or more" % opt.wrecZ)
    if not 0 <= opt.earlyRestart < 1:
        raise UserError("--earlyRestart %s: expected a found-again score from 0 (off) to under 1" % opt.earlyRestart)
    if opt.rollback < 0 or (opt.rollback and opt.autoRestart <= 0):
        raise UserError("--rollback %d: expected 0, or a positive number with --autoRestart x (the collapse test)"
                        % opt.rollback)
    utils.resolve_device(opt.device)


# ----------------------------------------------------------------------------- the sample grid

class SampleGrid:
    """The fixed test images and noise shown in every out_%05d.png.

    Layout, one block of nTest + 1 rows per region (the first row left black), one row per
    test image: input, ground truth, binarized mask, soft mask, composite with the test
    noise, then nTest composites where this region's noise is replaced by a fresh one
    (the same fresh noise down a column).
    """

    def __init__(self, x, m, z, zn):
        self.x, self.m, self.z, self.zn = x, m, z, zn

    @classmethod
    def draw(cls, testset, opt, device):
        """A shuffled batch of nTest test images and its noise, drawn as the original does."""
        x, m = next(iter(datasets.make_loader(testset, opt.nTest, opt.workers)))
        z = torch.randn((opt.nTest, opt.nMasks, opt.nz, 1, 1), device=device)
        zn = torch.randn((opt.nTest, opt.nz, 1, 1), device=device)
        m = m[:, :1].float()
        return cls(x.to(device), (m / m.amax(dim=(1, 2, 3), keepdim=True) * 2 - 1).to(device), z, zn)

    def state_dict(self):
        return {"x": self.x, "m": self.m, "z": self.z, "zn": self.zn}

    @torch.no_grad()
    def render(self, nets):
        """(nMasks * (nTest + 1) * (nTest + 5), C, H, W) images in [-1, 1]."""
        x, nTest = self.x, self.x.size(0)
        masks = nets.netEncM(x)
        nMasks = masks.size(1)
        grid = torch.full((nMasks, nTest + 1, nTest + 5) + x.shape[1:], -1.0, device=x.device)
        grid[:, 1:, 0] = x
        grid[:, 1:, 1] = self.m
        soft = masks.transpose(0, 1).unsqueeze(2) * 2 - 1  # (nMasks, nTest, 1, H, W)
        grid[:, 1:, 3] = soft
        grid[:, 1:, 2] = torch.sign(soft)
        grid[:, 1:, 4] = models.redraw(nets.netGenX, x, masks, self.z)[1].transpose(0, 1)
        for k, generator in enumerate(nets.netGenX.net):
            mask = masks[:, k:k + 1]
            for i in range(nTest):
                zn = self.zn[i].expand_as(self.z[:, k])
                grid[k, 1:, i + 5] = generator(mask, zn, zn) + (1 - mask) * x
        return grid.flatten(0, 2)

    def save(self, nets, path):
        """Render and write the grid; returns the picture (3, H, W) in [0, 1]."""
        picture = vutils.make_grid(self.render(nets), nrow=self.x.size(0) + 5, normalize=True, value_range=(-1, 1))
        utils.atomic_write(path, lambda f: vutils.save_image(picture, f, format="png"))
        return picture


# ----------------------------------------------------------------------------- checkpoints

DAT_FILES = ("train.dat", "val.dat")
NETWORK_OPTIONS = ("nx", "nz", "nMasks", "nResM", "nfD", "nfX", "nfM", "nfZ", "useSelfAttD", "useSelfAttG")


LABEL_FREE_IMAGES = 64  # the first validation images, scored without labels at each checkpoint
BEST_LABEL_FREE = "best_unsupervised.pth"


def label_free_inputs(valset, opt):
    """The images the label-free score is computed on, and the fixed noise that redraws them
    (from a generator of its own: the run's random streams are not touched)."""
    n = min(LABEL_FREE_IMAGES, len(valset))
    images = torch.stack([valset[i][0] for i in range(n)])
    noise = torch.randn((n, opt.nMasks, opt.nz, 1, 1), generator=torch.Generator().manual_seed(0))
    return images, noise


def state_path(opt, iteration):
    return os.path.join(opt.outf, "state_%05d.pth" % iteration)


def check_same_networks(saved, opt, path):
    """A checkpoint loads only into nets of its own configuration: name what differs."""
    differences = utils.option_differences(saved, opt, NETWORK_OPTIONS, "this run")
    if (saved.wrecZ > 0) != (opt.wrecZ > 0):
        differences += utils.option_differences(saved, opt, ["wrecZ"], "this run")
    if differences:
        raise UserError("%s: saved for another configuration: %s" % (path, ", ".join(differences)))


def checkpoint_files(outf):
    """The state_*.pth files of outf: what --resume chooses from (never a temporary file)."""
    return glob.glob(os.path.join(glob.escape(outf), "state_[0-9]*.pth"))


def newest_first(paths):
    return sorted(paths, key=lambda p: (os.path.getmtime(p), p), reverse=True)


def latest_checkpoint(outf, device):
    """(path, state) of the newest state_*.pth in outf that loads; incomplete ones are skipped."""
    for path in newest_first(checkpoint_files(outf)):
        try:
            return path, utils.load_checkpoint(path, device)
        except UserError as e:
            utils.warn("--resume: skipping %s" % e)
    raise UserError("--resume: no checkpoint to resume in --outf %s (no complete state_*.pth)" % outf)


# ----------------------------------------------------------------------------- the training run

COMPILE_BACKEND = "inductor"  # torch.compile's default, which generates code


def compile_nets(nets, backend=COMPILE_BACKEND):
    """--compile: torch.compile on each net, in place, so that the checkpoints keep their keys."""
    for _, net in nets.items():
        net.compile(backend=backend)


def tune_for_device(device):
    """Execution settings that change no number: cuDNN picks its fastest convolutions on a
    GPU; on the CPU, freed memory is kept for reuse (keep_freed_memory)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif device.type == "cpu":
        keep_freed_memory()


def keep_freed_memory():
    """Let glibc's malloc keep freed memory in the process instead of returning it to the
    system. Each iteration frees and allocates again the same large activations (167 MB a
    tensor at the paper's size); served by fresh mmap'd pages, every one of them costs a
    page fault and the kernel zeroing it, which made the paper configuration 1.25x slower
    on the CPU. The resident memory levels off a little above the peak (13% above it at
    the paper's size, measured over iterations). No effect outside glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from malloc.h
    libc.mallopt(M_MMAP_MAX, 0)        # large blocks from the heap, where freed ones are reused
    libc.mallopt(M_TRIM_THRESHOLD, -1)  # never hand the heap's free top back to the system


class TrainingRun:
    """What a run holds between iterations. Set up as the original sets up, drawing random
    numbers in its order; or from a checkpoint `start` (path, state), continuing exactly
    where it was saved."""

    def __init__(self, opt, start=None, dist=None):
        self.opt = opt
        self.dist = dist or Distributed()
        self.device = torch.device(opt.device)
        tune_for_device(self.device)
        self.log = print if self.dist.is_main and not opt.silent else (lambda *a: None)
        self.log("Random Seed: ", opt.manualSeed)
        utils.seed_everything(opt.manualSeed)
        splits = {split: self.load_split(split) for split in datasets.SPLITS}
        check_split_sizes(splits, opt)
        self.pin_memory = self.device.type == "cuda"  # batches copied to the GPU while it computes
        self.trainloader = datasets.make_loader(splits["train"], opt.batchSize, opt.workers, self.pin_memory)
        self.train_score_loader = self.trainloader if not opt.nTrainScore else datasets.make_loader(
            torch.utils.data.Subset(splits["train"], range(min(opt.nTrainScore, len(splits["train"])))),
            opt.batchSize, opt.workers, self.pin_memory)
        self.nets = self.build_nets()
        self.optimizers = make_optimizers(self.nets, opt)
        self.modules = self.dist.step_modules(self.nets)
        resume = None
        if start is not None:
            self.load_nets_and_optimizers(*start)
            resume = start[1].get("resume")
        elif self.dist.is_main:
            for name in ("train.dat", "test.dat", "val.dat"):
                if os.path.exists(os.path.join(opt.outf, name)):
                    os.remove(os.path.join(opt.outf, name))
        if resume is None:
            self.grid = SampleGrid.draw(splits["test"], opt, self.device)
        else:
            self.grid = SampleGrid(**{k: v.to(self.device) for k, v in resume["sampleGrid"].items()})
        self.valloader = datasets.make_loader(splits["val"], opt.batchSize, opt.workers, self.pin_memory)
        self.label_free_images, self.label_free_noise = label_free_inputs(splits["val"], opt)
        self.genData = self.batch_stream(resume and resume["genData"])
        self.disData = self.batch_stream(resume and resume["disData"])
        self.stats = []  # the records of stats.jsonl
        if resume is not None:
            if self.dist.is_main:
                for name in DAT_FILES:
                    utils.truncate_lines(os.path.join(opt.outf, name), resume["datLines"][name])
                self.stats = self.continue_stats(resume)
            utils.restore_rng_states(resume["rng"])
        elif start is None and self.dist.is_main:
            for name in (utils.STATS_FILE, "curves.png"):
                if os.path.exists(os.path.join(opt.outf, name)):
                    os.remove(os.path.join(opt.outf, name))
        self.tensorboard = None
        if opt.tensorboard and self.dist.is_main:
            self.tensorboard = utils.tensorboard_writer(opt.outf, purge_step=self.stats[-1]["step"] + 1
                                                        if self.stats else None)
        self.events = ["resume"] if start is not None else []
        self.start_period()
        if resume is not None and "period" in resume:  # stopped between two checkpoints
            self.period_losses.load_state_dict(resume["period"]["losses"])
            self.period_iterations = resume["period"]["iterations"]
            self.period_start -= resume["period"]["seconds"]

    def continue_stats(self, resume):
        """stats.jsonl as it was at the checkpoint resumed from (one written before this log
        existed starts it anew)."""
        path = os.path.join(self.opt.outf, utils.STATS_FILE)
        if resume.get("stats") is None:
            if os.path.exists(path):
                os.remove(path)
            return []
        return utils.continue_stats(path, resume["datLines"][utils.STATS_FILE], resume["stats"])

    def start_period(self):
        self.period_losses = utils.PeriodLosses()
        self.period_iterations = 0
        self.period_start = time.perf_counter()

    def batch_stream(self, state=None):
        """Endless training batches (this rank's share of each), from `state` or a new epoch."""
        return datasets.BatchStream(self.trainloader.dataset, self.opt.batchSize, self.opt.workers, state,
                                    rank=self.dist.rank, world=self.dist.world, pin_memory=self.pin_memory)

    def load_split(self, split):
        opt = self.opt
        dataset = datasets.make_dataset(opt.dataset, opt.dataroot, split, opt.sizex, opt.maskroot)
        if opt.cacheData:
            dataset = datasets.InMemoryDataset(dataset, opt.workers)
            self.log("cached the %s split in memory: %d images, %.0f MB" % (split, len(dataset), dataset.nbytes() / 2**20))
        return dataset

    def build_nets(self, netRecZ=None):
        """The nets, compiled with --compile (in place: the checkpoints keep their keys)."""
        nets = models.build_nets(self.opt, self.device, netRecZ=netRecZ, skip_ortho_init_sn=self.opt.skipOrthoInitSN)
        if self.opt.compile:
            compile_nets(nets, COMPILE_BACKEND)
        return nets

    def autocast(self):
        """Mixed precision (--amp bf16) for the training iterations; scores stay in fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.opt.amp == "bf16")

    def load_nets_and_optimizers(self, path, state):
        check_same_networks(state["options"], self.opt, path)
        for name, net in self.nets.items():
            net.load_state_dict(state[name])
        overridden = []
        for name, optimizer in self.optimizers.items():
            overridden += overridden_flags(name, state[name], self.opt)
            load_optimizer_state(optimizer, state[name])
        if overridden:
            utils.warn("%s: its optimizers keep their saved settings, as in the original; ignoring %s"
                       % (path, ", ".join(overridden)))

    # -------------------------------------------------------------- an iteration

    def train_one_iteration(self):
        opt = self.opt
        xData = next(self.genData)[0].to(self.device, non_blocking=True)
        xReal = next(self.disData)[0].to(self.device, non_blocking=True)
        # the noise of the whole batch, drawn alike on every rank; each takes its own share
        batch = xData.size(0) * self.dist.world
        zData = self.share(torch.randn((batch, opt.nMasks, opt.nz, 1, 1), device=self.device))
        if opt.hflip:
            xData = augment.flip_horizontally(xData, self.share(augment.draw_flips(batch)))
            xReal = augment.flip_horizontally(xReal, self.share(augment.draw_flips(batch)))
        augmentations = (None, None)
        if opt.diffAugment:
            augmentations = tuple(augment.DiffAugment.draw(opt.diffAugment, batch, opt.sizex).map(self.share)
                                  for _ in ("generator step", "discriminator step"))
        with self.autocast():
            losses = training_iteration(self.nets, self.optimizers, xData, xReal, zData, opt, opt.iteration,
                                        self.modules, augmentations)
        check_finite(losses, opt.iteration)
        self.period_losses.add(losses)
        self.period_iterations += 1
        opt.iteration += 1

    def share(self, whole):
        """This rank's share of something drawn for the whole batch of every rank."""
        part = len(whole) // self.dist.world
        return whole[self.dist.rank * part:(self.dist.rank + 1) * part]

    # -------------------------------------------------------------- the end of a period (rank 0)

    def score(self):
        """Accuracy, IoU and smallest region size of the mask extractor on the train split (its
        first --nTrainScore images) and the validation split, appended to train.dat and val.dat."""
        self.score_start = time.perf_counter()
        desc = None if self.opt.silent else "scoring %s"
        scores = {split: utils.evaluate(self.nets.netEncM, loader, self.device, desc and desc % split)
                  for split, loader in (("train", self.train_score_loader), ("val", self.valloader))}
        for split, (acc, iou, _, _) in scores.items():
            self.log(split + ":", acc, iou)
            utils.append_line(os.path.join(self.opt.outf, split + ".dat"), "%d %s %s" % (self.opt.iteration, acc, iou))
        return scores

    def drop_last_scores(self):
        """Take back the lines score() just appended: --earlyRestart keeps nothing of the start
        it abandons (its record in stats.jsonl stays, with the event)."""
        for name in DAT_FILES:
            path = os.path.join(self.opt.outf, name)
            utils.truncate_lines(path, utils.count_lines(path) - 1)

    def label_free_score(self):
        """The label-free scores of the masks on the first validation images (no ground truth
        read, no random number drawn)."""
        start = time.perf_counter()
        scores = utils.label_free_scores(self.nets, self.label_free_images, self.label_free_noise,
                                         max(self.opt.batchSize, 32))
        self.label_free_seconds = time.perf_counter() - start
        return scores

    def draw_sample_grid(self):
        """out_%05d.png; returns the picture (3, H, W) in [0, 1]."""
        with utils.eval_mode(*(net for _, net in self.nets.items())):
            return self.grid.save(self.nets, os.path.join(self.opt.outf, "out_%05d.png" % self.opt.iteration))

    def collapse_action(self, scores, label_free):
        """After the --autoRestart test: None (no collapse, or one past iteration 7000, as the
        original), "rollback" (--rollback, while some are left and a checkpoint exists) or
        "restart" (the original's, up to iteration 7000); without a collapse, "early_restart"
        for a start_gone_wrong. Told on stdout."""
        opt = self.opt
        if not utils.has_collapsed([scores["train"].min_region_size, scores["val"].min_region_size],
                                   opt.autoRestart):
            return "early_restart" if self.start_gone_wrong(label_free.refound) else None
        print("Training appear to have collapsed.")
        if opt.rollbacks < opt.rollback and checkpoint_files(opt.outf):
            print("Rolling back to %s (rollback %d of %d), with fresh noise and data order."
                  % (self.rollback_target(), opt.rollbacks + 1, opt.rollback))
            return "rollback"
        if opt.iteration > 7000:
            return None
        print("Reinitializing training.")
        return "restart"

    def start_gone_wrong(self, refound):
        """--earlyRestart: whether the first checkpoint of a start (from scratch) has a found-again
        score (refound, utils.label_free_scores) under x, while restarts are left. Such a start
        has settled on a region netEncM does not find again in its composites, and stays there
        until the collapse test fires (600 to 1100 iterations later in the quickstart: README)."""
        opt = self.opt
        if not (opt.iteration == opt.checkpointFreq and refound < opt.earlyRestart
                and opt.earlyRestarts < EARLY_RESTARTS):
            return False
        print("Found-again score %.3f under --earlyRestart %s at the first checkpoint: restarting from scratch "
              "(%d of %d)." % (refound, opt.earlyRestart, opt.earlyRestarts + 1, EARLY_RESTARTS))
        return True

    def record_statistics(self, scores, label_free, action, grid):
        """A record of the period in stats.jsonl, curves.png redrawn, TensorBoard (--tensorboard),
        and a one-line summary on stdout."""
        opt, now = self.opt, time.perf_counter()
        previous = self.stats[-1] if self.stats else {"step": 0, "seconds": 0.0}
        train_seconds = self.score_start - self.period_start
        record = {
            "iteration": opt.iteration, "step": previous["step"] + self.period_iterations,
            "seconds": round(previous["seconds"] + now - self.period_start, 3),
            "period_seconds": round(train_seconds, 3), "score_seconds": round(now - self.score_start, 3),
            "iterations_per_second": round(self.period_iterations / train_seconds, 4),
            "images_per_second": round(self.period_iterations * opt.batchSize / train_seconds, 3),
            "losses": self.period_losses.summary(),
            "region_sizes": {split: [round(size, 5) for size in s.region_sizes] for split, s in scores.items()},
            **{"%s_%s" % (split, key): utils.json_number(getattr(s, key))
               for split, s in scores.items() for key in ("acc", "iou")},
            "label_free": label_free._asdict(),
            "label_free_seconds": round(self.label_free_seconds, 3),
            "events": self.events + ([action] if action else []),
            "peak_memory_mb": utils.json_number(peak_memory_mb(self.device))}
        utils.append_line(os.path.join(opt.outf, utils.STATS_FILE), json.dumps(record))
        self.stats.append(record)
        self.events = []
        self.start_period()
        utils.plot_curves(self.stats, os.path.join(opt.outf, "curves.png"), opt.autoRestart)
        if self.tensorboard is not None:
            for name, value in utils.flat_scalars(record).items():
                self.tensorboard.add_scalar(name, value, record["step"])
            self.tensorboard.add_image("sample_grid", grid, record["step"])
            self.tensorboard.flush()
        self.log(summary_line(record))

    def save_checkpoint(self, val_iou=None, label_free=None):
        """state_%05d.pth and options.pth; best.pth when the validation IoU is the best so
        far, best_unsupervised.pth when the label-free score is (neither for a checkpoint
        between two periods, when the run is stopped); with --clean, stale_checkpoints()
        go once the new one is complete."""
        opt = self.opt
        is_best = val_iou is not None and opt.bestValIoU < val_iou
        if is_best:
            opt.bestValIoU = val_iou
        is_best_label_free = label_free is not None and opt.bestLabelFree < label_free
        if opt.iteration >= opt.collapsedAt:  # a healthy checkpoint where it collapsed, or past it
            opt.rollbacksInARow = 0
        if is_best_label_free:
            opt.bestLabelFree = label_free
        state = self.state_dict()
        utils.atomic_save(state, state_path(opt, opt.iteration))
        utils.atomic_save(opt, os.path.join(opt.outf, "options.pth"))
        if is_best:
            utils.atomic_save(state, os.path.join(opt.outf, "best.pth"))
        if is_best_label_free:
            utils.atomic_save(state, os.path.join(opt.outf, BEST_LABEL_FREE))
        if opt.clean:
            for path in self.stale_checkpoints():
                os.remove(path)

    def stale_checkpoints(self):
        """What --clean removes once a checkpoint is written: as the original, the state
        files of the period before it; with --rollback N, all but the N newest before it,
        which a rollback may go back to."""
        opt = self.opt
        if opt.rollback:
            return newest_first(set(checkpoint_files(opt.outf)) - {state_path(opt, opt.iteration)})[opt.rollback:]
        return [state_path(opt, iteration) for iteration in range(max(opt.iteration - opt.checkpointFreq, 1),
                                                                  opt.iteration)
                if os.path.exists(state_path(opt, iteration))]

    def state_dict(self):
        """The original's keys, and under 'resume' what continuing exactly needs."""
        state = {name: net.state_dict() for name, net in self.nets.items()}
        state.update({name: optimizer.state_dict() for name, optimizer in self.optimizers.items()})
        state["options"] = self.opt
        state["resume"] = {
            "genData": self.genData.state_dict(), "disData": self.disData.state_dict(),
            "sampleGrid": self.grid.state_dict(), "rng": utils.rng_states(),
            "datLines": {name: utils.count_lines(os.path.join(self.opt.outf, name))
                         for name in DAT_FILES + (utils.STATS_FILE,)},
            "stats": self.stats[-1] if self.stats else None,
            "period": {"iterations": self.period_iterations, "losses": self.period_losses.state_dict(),
                       "seconds": time.perf_counter() - self.period_start}}
        return state

    # -------------------------------------------------------------- every rank

    def restart(self):
        """Fresh nets and optimizers after a collapse, drawing random numbers as the
        original does (its noise reconstructor is re-initialised in place); the data
        streams go on."""
        self.nets = self.build_nets(netRecZ=self.nets.netRecZ)
        self.optimizers = make_optimizers(self.nets, self.opt)
        self.modules = self.dist.step_modules(self.nets)
        self.opt.iteration = 0

    def rollback_target(self):
        """The checkpoint a rollback goes back to: the newest, or for each rollback in a row
        (before the run gets past the iteration it collapsed at) one further back, as far as
        the checkpoints go: a collapse is often under way by the last checkpoint before it."""
        files = newest_first(checkpoint_files(self.opt.outf))
        return files[min(self.opt.rollbacksInARow, len(files) - 1)]

    def rollback(self):
        """Back to rollback_target() after a collapse, with fresh noise and a fresh data order
        (seeded from --manualSeed and the rollback's number, alike on every rank), so that
        the same collapse is not replayed."""
        opt = self.opt
        path = self.rollback_target()
        state = utils.load_checkpoint(path, "cpu")
        opt.collapsedAt = max(opt.collapsedAt, opt.iteration)
        opt.rollbacks += 1
        opt.rollbacksInARow += 1
        self.load_nets_and_optimizers(path, state)
        opt.iteration = state["options"].iteration
        utils.seed_everything(opt.manualSeed + ROLLBACK_SEED_STRIDE * opt.rollbacks)
        self.genData, self.disData = self.batch_stream(), self.batch_stream()

    def stop(self, signum):
        """Asked to stop (SIGINT, SIGTERM): a checkpoint of this very iteration, unless the
        period's checkpoint was just written, and one line on how to continue."""
        opt = self.opt
        if self.dist.is_main:
            if opt.iteration % opt.checkpointFreq:
                self.save_checkpoint()
            by = signal.Signals(signum).name if signum else "another process"
            if os.path.exists(state_path(opt, opt.iteration)):
                print("stopped by %s at iteration %d: %s holds it; continue with: python train.py --resume --outf %s"
                      % (by, opt.iteration, state_path(opt, opt.iteration), opt.outf), file=sys.stderr)
            else:
                print("stopped by %s before training began" % by, file=sys.stderr)
            self.log(self.summary())
        self.dist.barrier()

    def summary(self):
        """One line for the end of the run: the best checkpoint, the last one, what to run next."""
        opt = self.opt
        last = next(iter(newest_first(checkpoint_files(opt.outf))), "none")
        val = utils.read_dat(os.path.join(opt.outf, "val.dat"))
        best = [iteration for iteration, _, iou in val if iou == opt.bestValIoU]
        scored = [r for r in self.stats if "label_free" in r]  # (a log continued from an older version)
        label_free = [r["iteration"] for r in scored if r["label_free"]["score"] == opt.bestLabelFree]
        unsupervised = os.path.join(opt.outf, BEST_LABEL_FREE)
        chosen = os.path.join(opt.outf, "best.pth") if best else unsupervised if label_free else last
        if best:
            verdict = "best validation IoU %.4f at iteration %d (%s)" % (opt.bestValIoU, best[0], chosen)
        elif val:
            verdict = "no validation IoU (no ground-truth masks), so no best.pth"
        else:
            verdict = "no checkpoint scored yet"
        if label_free:
            verdict += "; best label-free score %.3f at iteration %d (%s)" % (opt.bestLabelFree, label_free[-1],
                                                                             unsupervised)
        return ("done: %s; last checkpoint %s; segment with: python example_load_pretrained.py --statePath %s%s"
                % (verdict, last, chosen, "" if not datasets.needs_dataroot(opt.dataset) else
                   " --dataroot %s" % opt.dataroot))


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler taking the machine back) ask the run to stop
    after the iteration in progress: the handlers only note the signal, so that nothing is
    interrupted halfway; a second signal while saving changes nothing (files are atomic)."""

    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # where Python runs handlers
            self.previous = {s: signal.signal(s, self.handle) for s in self.signals}
        return self

    def handle(self, signum, frame):
        if self.signal is None and utils.is_main_process():
            print("\n%s: stopping after this iteration, with a checkpoint" % signal.Signals(signum).name,
                  file=sys.stderr)
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def summary_line(record):
    """The one line printed at each checkpoint: losses, region sizes, validation IoU, label-free
    score, speed."""
    losses = " ".join("%s %.3f" % (name, value["mean"]) for name, value in record["losses"].items())
    sizes = ", ".join("%s %s" % (split, " ".join("%.2f" % s for s in sizes))
                      for split, sizes in record["region_sizes"].items())
    iou = "" if record["val_iou"] is None else " | val IoU %.4f" % record["val_iou"]
    return "iteration %d: %s | region sizes %s%s | label-free %.3f | %.2f it/s%s" % (
        record["iteration"], losses, sizes, iou, record["label_free"]["score"], record["iterations_per_second"],
        "".join(" | " + event for event in record["events"]))


def peak_memory_mb(device):
    """The most memory the run has held: on the GPU, by its tensors; on the CPU, the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def check_split_sizes(splits, opt):
    """Every split holds what is drawn from it (whole batches; the sample grid's test
    images), checked before any training."""
    needs = {"train": ("batchSize", opt.batchSize), "val": ("batchSize", opt.batchSize), "test": ("nTest", opt.nTest)}
    for split, dataset in splits.items():
        flag, needed = needs[split]
        if len(dataset) < needed:
            raise UserError("the %s split of --dataset %s has %d image%s; --%s %d needs at least %d: add images "
                            "or lower --%s" % (split, opt.dataset, len(dataset), "" if len(dataset) == 1 else "s",
                                               flag, needed, needed, flag))


def check_finite(losses, iteration):
    if torch.isfinite(torch.stack(list(losses.values()))).all():
        return
    for name, value in losses.items():
        if not torch.isfinite(value):
            raise UserError("iteration %d: %s is %s; training diverged. The last checkpoint in --outf is intact "
                            "(resume from it, perhaps with smaller learning rates)" % (iteration, name, value.item()))


def check_output_folder(outf):
    try:
        os.makedirs(outf, exist_ok=True)
        utils.atomic_write(os.path.join(outf, ".write_test"), lambda f: f.write(b"ok"))
        os.remove(os.path.join(outf, ".write_test"))
    except OSError as e:
        raise UserError("--outf %s: cannot write there (%s)" % (outf, e.strerror or e)) from None


SHARED_PROGRESS = ("bestValIoU", "bestLabelFree", "rollbacksInARow")  # options rank 0 updates at a checkpoint


def train(opt, start=None, dist=None):
    """The original's training loop: iterations until --nIteration; every --checkpointFreq,
    rank 0 scores, draws the sample grid, and restarts after a collapse or saves a
    checkpoint, and every rank follows its decision. Returns the TrainingRun at its end."""
    dist = dist or Distributed()
    if dist.is_main:
        check_output_folder(opt.outf)
        if start is None and opt.overwrite:
            remove_run_files(opt.outf)
    dist.barrier()
    run = TrainingRun(opt, start, dist)
    del start  # its tensors are loaded; free them
    progress = None
    stopped = False
    with StopRequest() as stop:
        while opt.iteration <= opt.nIteration:
            stopped = dist.any(stop.signal is not None)
            if stopped:
                break
            progress = progress or tqdm(total=opt.checkpointFreq, disable=not dist.is_main or opt.silent)
            run.train_one_iteration()
            progress.update(1)
            if opt.iteration % 10 == 0 and not progress.disable:
                progress.set_postfix({name: "%.3f" % v for name, v in run.period_losses.last_values().items()})
            if opt.iteration % opt.checkpointFreq:
                continue
            progress = progress.close()
            decision = None
            if dist.is_main:
                scores = run.score()
                label_free = run.label_free_score()
                grid = run.draw_sample_grid()
                action = run.collapse_action(scores, label_free)
                run.record_statistics(scores, label_free, action, grid)
                if action is None:
                    run.save_checkpoint(scores["val"].iou, label_free.score)
                elif action == "early_restart":
                    run.drop_last_scores()
                decision = {"action": action, "rng": utils.rng_states(),
                            "progress": {name: getattr(opt, name) for name in SHARED_PROGRESS}}
            else:
                run.start_period()
            decision = dist.share(decision)
            utils.restore_rng_states(decision["rng"])  # rank 0's evaluation loaders drew from it
            for name, value in decision["progress"].items():
                setattr(opt, name, value)
            if decision["action"] == "restart":
                run.restart()
            elif decision["action"] == "early_restart":
                opt.earlyRestarts += 1
                run.restart()
            elif decision["action"] == "rollback":
                run.rollback()
        if progress is not None:
            progress.close()
        if run.tensorboard is not None:
            run.tensorboard.close()
        if stopped:
            run.stop(stop.signal)
        else:
            run.log(run.summary())
    return run


# ----------------------------------------------------------------------------- several processes (torchrun)

@dataclass
class Distributed:
    """This process's place among torchrun's: rank 0 of 1 without torchrun. flags: the
    process group that agrees on host-side flags (the stop), on the CPU (gloo) whatever the
    training's backend, so that agreeing never waits for a GPU."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    flags: Optional[object] = None

    @property
    def is_main(self):
        return self.rank == 0

    @classmethod
    def from_environment(cls, opt):
        """Join torchrun's process group (RANK, WORLD_SIZE, LOCAL_RANK in the environment)
        and give this process its device: cuda:LOCAL_RANK on GPUs, else the CPU (gloo)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if opt.batchSize % world:
            raise UserError("--batchSize %d: under torchrun it is the global batch, split evenly over the %d "
                            "processes; use a multiple of %d" % (opt.batchSize, world, world))
        dist = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if torch.device(opt.device).type == "cuda":
            opt.device = "cuda:%d" % dist.local_rank
            torch.cuda.set_device(opt.device)
        torch.distributed.init_process_group("nccl" if opt.device.startswith("cuda") else "gloo",
                                             **restart_store(dist))
        if torch.distributed.get_backend() != "gloo":
            dist.flags = torch.distributed.new_group(backend="gloo")
        return dist

    def step_modules(self, nets):
        """What the training steps call: DistributedDataParallel wrappers under torchrun.
        Spectral-norm vectors depend only on the weights, which DDP keeps equal, so every
        rank updates them alike: no buffer broadcast."""
        if self.world == 1:
            return StepModules.of(nets)
        device = next(nets.netEncM.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return StepModules.of(nets, lambda module: torch.nn.parallel.DistributedDataParallel(
            module, device_ids=ids, broadcast_buffers=False))

    def share(self, obj):
        """rank 0's obj, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def any(self, flag):
        """Whether any rank's flag is set (every rank gets the same answer: each stops at the
        same iteration). Asked at every iteration, over the CPU group `flags`: it neither
        waits for the GPU nor makes the GPU wait."""
        if self.world == 1:
            return flag
        tensor = torch.tensor([float(flag)])
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=self.flags)
        return bool(tensor.item())

    def close(self):
        if self.world > 1:
            torch.distributed.destroy_process_group()


def restart_store(dist):
    """Under torchrun, the process group's store: torchrun's own, under a prefix for each start
    of the group (TORCHELASTIC_RESTART_COUNT). With one shared by every start, a group that
    torchrun --max-restarts restarts reads the addresses of the processes it replaced and
    cannot connect (seen with gloo, torch 2.14). Elsewhere, torch's default (env://)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    prefixed = torch.distributed.PrefixStore("start_%s" % os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), store)
    return {"store": prefixed, "rank": dist.rank, "world_size": dist.world}


def main(argv=None):
    dist = Distributed()
    try:
        opt, start = resolve_options(make_parser().parse_args(argv), explicit_flags(argv))
        dist = Distributed.from_environment(opt)
        train(opt, start, dist)
    except UserError as e:
        sys.exit("error: %s" % utils.user_error_message(e))
    finally:
        dist.close()


if __name__ == "__main__":
    main()
