"""Train ReDO: a mask extractor learns to segment because redrawn regions must fool a discriminator.

    python train.py --dataset flowers --nfX 32 --useSelfAttG --useSelfAttD --outf OUT --dataroot DATA --clean

The loop is train(), near the end: each iteration, TrainingRun.train_one_iteration() runs
training_iteration() (a generator step, then a discriminator step); at each checkpoint, rank 0's
TrainingRun.end_of_period() judges the nets and decides, and every rank follow()s. Before it:
the steps, the options, the sample grid, checkpoint files, the run's Progress; after it, torchrun.
"""
import argparse
import contextlib
import ctypes
import glob
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision.utils as vutils

import augment
import datasets
import models
import monitor
import scores
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
    def for_nets(cls, nets, wrap=lambda module: module):
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
    modules = modules or StepModules.for_nets(nets)
    nets.zero_grad()
    nets.train()
    losses = {}
    if iteration % opt.gStepFreq == 0:
        losses.update(generator_step(modules, optimizers, xData, zData, opt.wrecZ, augmentations[0]))
    if iteration % opt.dStepFreq == 0:
        losses.update(discriminator_step(modules, optimizers, xData, xReal, zData, augmentations[1]))
    return losses


# ----------------------------------------------------------------------------- options

RESTARTS_UNTIL = 7000  # the original restarts after a collapse up to this iteration, not later
EARLY_RESTARTS = 5  # at most, in a run: each costs a checkpoint period


def make_parser():
    p = argparse.ArgumentParser(description="Train ReDO (unsupervised object segmentation by redrawing).",
                                formatter_class=utils.HelpFormatter)
    p.add_argument('--dataset', default="flowers",
                   help='flowers | cub | lfw | cmnist | synthetic (built in, no download) | folder (your images) '
                        '| lfw+flowers (--dataroot LFW_ROOT,FLOWERS_ROOT)')
    p.add_argument('--dataroot', default='./data', help='path to dataset')
    p.add_argument('--maskroot', default=None, help='--dataset folder: folder of ground-truth masks (optional)')
    p.add_argument('--nx', type=int, default=3, help='number of channels of the input image')
    p.add_argument('--sizex', type=int, default=128, help='size of the input image: 128 (the original) or 64 (a quarter of the pixels, for CPUs)')
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
                        'test), not the whole split as the original (0)')
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
        saved = complete_options(argparse.Namespace(**vars(state["options"])))  # a copy: the state keeps its own
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
        for field in fields(Progress):  # the run's, not options: TrainingRun reads them
            if field.name != "iteration" and field.name in saved:
                delattr(saved, field.name)
        opt, start = saved, (path, state)
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


def options_for(*flags):
    """The options of a run started with these command-line flags (any values, made strings),
    resolved as main() resolves them: for the tests and tools that build a run in-process."""
    return resolve_options(make_parser().parse_args([str(f) for f in flags]))[0]


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
    if opt.sizex not in models.SUPPORTED_SIZEX:
        raise UserError("--sizex %d: expected 128 (the original's networks) or 64 (the same networks on a quarter "
                        "of the pixels)" % opt.sizex)
    if opt.dataset == "cmnist" and opt.sizex != datasets.CMNISTDataset.size:
        raise UserError("--sizex %d: --dataset cmnist draws %dx%d images only" % (
            opt.sizex, datasets.CMNISTDataset.size, datasets.CMNISTDataset.size))
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


BEST_LABEL_FREE = "best_unsupervised.pth"  # the checkpoint the label-free score chooses


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


# ----------------------------------------------------------------------------- the run's progress

@dataclass
class Progress:
    """Where a run stands, apart from the options it was given: saved in every checkpoint and,
    at a checkpoint, decided by rank 0 and shared with every rank as one value."""
    iteration: int = 0
    bestValIoU: float = 0.0  # that of best.pth
    bestLabelFree: float = -1.0  # that of best_unsupervised.pth
    rollbacks: int = 0  # how many --rollback the run has used
    rollbacksInARow: int = 0  # how many since the run last got past the iteration it collapsed at
    collapsedAt: int = 0
    earlyRestarts: int = 0  # how many --earlyRestart the run has used

    @classmethod
    def of_checkpoint(cls, state):
        """The progress a checkpoint was saved at. The original's keep the iteration and the best
        validation IoU in their options (as ours do too), the rest is ours."""
        saved = (state.get("resume") or {}).get("progress")
        if saved is None:
            options = state["options"]
            saved = {f.name: getattr(options, f.name) for f in fields(cls) if f.name in options}
        return cls(**saved)


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
    system. Each iteration frees and allocates again the same large activations; served by
    fresh mmap'd pages, every one of them costs a page fault and the kernel zeroing it
    (README, Speed, says what this saves and costs). No effect outside glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from malloc.h
    libc.mallopt(M_MMAP_MAX, 0)        # large blocks from the heap, where freed ones are reused
    libc.mallopt(M_TRIM_THRESHOLD, -1)  # never hand the heap's free top back to the system


def timed(function, *args):
    """function(*args) and the seconds it took."""
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


class TrainingRun:
    """What a run holds between iterations: data, nets, optimizers, its progress and its
    monitor. Set up as the original sets up, drawing random numbers in its order (start_fresh);
    or from a checkpoint `start` (path, state), continuing exactly where it was saved
    (continue_from)."""

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
        if start is None:
            self.start_fresh(splits)
        else:
            self.continue_from(*start, splits)

    def start_fresh(self, splits):
        """A new run: the sample grid and the batch streams drawn as the original draws them;
        a replaced run's logs go."""
        if self.dist.is_main:
            for name in DAT_FILES:
                if os.path.exists(os.path.join(self.opt.outf, name)):
                    os.remove(os.path.join(self.opt.outf, name))
        self.progress = Progress()
        self.set_up_draws(splits)
        self.monitor = monitor.Monitor.fresh(self.opt, self.device, self.log, self.dist.is_main)

    def continue_from(self, path, state, splits):
        """From a checkpoint: ours (with "resume") continue exactly, data streams, random states
        and logs included; the original's give their weights to a run that otherwise starts anew.
        --resume continues the checkpoint's progress, --iteration N only its iteration."""
        self.load_nets_and_optimizers(path, state)
        resume = state.get("resume")
        self.progress = Progress.of_checkpoint(state) if self.opt.resume else Progress(iteration=self.opt.iteration)
        self.set_up_draws(splits, resume)
        if resume is None:
            self.monitor = monitor.Monitor(self.opt, self.device, self.log, self.dist.is_main)
            self.monitor.events.append("resume")
            return
        if self.dist.is_main:
            for name in DAT_FILES:
                utils.truncate_lines(os.path.join(self.opt.outf, name), resume["datLines"][name])
        utils.restore_rng_states(resume["rng"])
        self.monitor = monitor.Monitor.resumed(self.opt, self.device, self.log, self.dist.is_main, resume)

    def set_up_draws(self, splits, resume=None):
        """The sample grid and the batch streams, drawn in the original's order or restored from
        `resume`; between them, the validation loader and the label-free score's inputs."""
        if resume is None:
            self.grid = SampleGrid.draw(splits["test"], self.opt, self.device)
        else:
            self.grid = SampleGrid(**{k: v.to(self.device) for k, v in resume["sampleGrid"].items()})
        self.valloader = datasets.make_loader(splits["val"], self.opt.batchSize, self.opt.workers, self.pin_memory)
        self.label_free_images, self.label_free_noise = scores.label_free_inputs(splits["val"], self.opt.nMasks,
                                                                                 self.opt.nz)
        self.genData = self.batch_stream(resume and resume["genData"])
        self.disData = self.batch_stream(resume and resume["disData"])

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

    # -------------------------------------------------------------- an iteration (every rank)

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
            losses = training_iteration(self.nets, self.optimizers, xData, xReal, zData, opt,
                                        self.progress.iteration, self.modules, augmentations)
        check_finite(losses, self.progress.iteration)
        self.progress.iteration += 1
        self.monitor.add(losses, self.progress.iteration)

    def share(self, whole):
        """This rank's share of something drawn for the whole batch of every rank."""
        part = len(whole) // self.dist.world
        return whole[self.dist.rank * part:(self.dist.rank + 1) * part]

    # -------------------------------------------------------------- the end of a period (rank 0)

    def end_of_period(self):
        """At a checkpoint, rank 0 judges the nets (scores with and without labels, the sample
        grid), decides what the run does next, records the period, and saves the checkpoint
        when the run goes on. Returns the decision every rank follows (follow())."""
        self.monitor.close_bar()
        training_seconds = self.monitor.period_seconds()
        start = time.perf_counter()
        split_scores = self.score()
        self.append_scores(split_scores)
        label_free, label_free_seconds = timed(self.label_free_score)
        grid = self.draw_sample_grid()
        action = self.recovery_action(split_scores, label_free)
        self.monitor.record(self.progress.iteration, split_scores, label_free, action, grid,
                            {"training": training_seconds, "scoring": time.perf_counter() - start,
                             "label_free": label_free_seconds})
        if action is None:
            self.save_checkpoint(split_scores["val"].iou, label_free.score)
        elif action == "early_restart":
            self.drop_last_scores()
        return {"action": action, "rng": utils.rng_states(), "progress": asdict(self.progress)}

    def score(self):
        """Accuracy, IoU and smallest region size of the mask extractor on the train split (its
        first --nTrainScore images) and the validation split."""
        desc = None if self.opt.silent else "scoring %s"
        return {split: scores.evaluate(self.nets.netEncM, loader, self.device, desc and desc % split)
                for split, loader in (("train", self.train_score_loader), ("val", self.valloader))}

    def append_scores(self, split_scores):
        """A line in train.dat and val.dat, and on stdout, as the original."""
        for split, (acc, iou, _, _) in split_scores.items():
            self.log(split + ":", acc, iou)
            utils.append_line(os.path.join(self.opt.outf, split + ".dat"),
                              "%d %s %s" % (self.progress.iteration, acc, iou))

    def drop_last_scores(self):
        """Take back the lines append_scores() just wrote: --earlyRestart keeps nothing of the
        start it abandons (its record in stats.jsonl stays, with the event)."""
        for name in DAT_FILES:
            path = os.path.join(self.opt.outf, name)
            utils.truncate_lines(path, utils.count_lines(path) - 1)

    def label_free_score(self):
        """The label-free scores of the masks on the first validation images (no ground truth
        read, no random number drawn)."""
        return scores.label_free_scores(self.nets, self.label_free_images, self.label_free_noise)

    def draw_sample_grid(self):
        """out_%05d.png; returns the picture (3, H, W) in [0, 1]."""
        with utils.eval_mode(*(net for _, net in self.nets.items())):
            return self.grid.save(self.nets, os.path.join(self.opt.outf, "out_%05d.png" % self.progress.iteration))

    def recovery_action(self, split_scores, label_free):
        """What the run does about a checkpoint gone wrong, told on stdout: after a collapse (the
        --autoRestart test), "rollback" (--rollback, while some are left and a checkpoint
        exists) or "restart" (the original's, up to RESTARTS_UNTIL; later None, as the
        original); without a collapse, "early_restart" for a start gone wrong
        (early_restart_due), else None."""
        opt, progress = self.opt, self.progress
        if not scores.has_collapsed([split_scores["train"].min_region_size, split_scores["val"].min_region_size],
                                    opt.autoRestart):
            return "early_restart" if self.early_restart_due(label_free.refound) else None
        print("Training appear to have collapsed.")
        if progress.rollbacks < opt.rollback and checkpoint_files(opt.outf):
            print("Rolling back to %s (rollback %d of %d), with fresh noise and data order."
                  % (self.rollback_target(), progress.rollbacks + 1, opt.rollback))
            return "rollback"
        if progress.iteration > RESTARTS_UNTIL:
            return None
        print("Reinitializing training.")
        return "restart"

    def early_restart_due(self, refound):
        """--earlyRestart: whether the first checkpoint of a start (from scratch) has a found-again
        score (refound, scores.label_free_scores) under x, while restarts are left. Such a start
        has settled on a region netEncM does not find again in its composites, and stays there
        until the collapse test fires (README, Choosing a checkpoint without labels)."""
        opt, progress = self.opt, self.progress
        if not (progress.iteration == opt.checkpointFreq and refound < opt.earlyRestart
                and progress.earlyRestarts < EARLY_RESTARTS):
            return False
        print("Found-again score %.3f under --earlyRestart %s at the first checkpoint: restarting from scratch "
              "(%d of %d)." % (refound, opt.earlyRestart, progress.earlyRestarts + 1, EARLY_RESTARTS))
        return True

    def save_checkpoint(self, val_iou=None, label_free=None):
        """state_%05d.pth and options.pth; best.pth when the validation IoU is the best so
        far, best_unsupervised.pth when the label-free score is (neither for a checkpoint
        between two periods, when the run is stopped); with --clean, stale_checkpoints()
        go once the new one is complete."""
        opt, progress = self.opt, self.progress
        is_best = val_iou is not None and progress.bestValIoU < val_iou
        if is_best:
            progress.bestValIoU = val_iou
        is_best_label_free = label_free is not None and progress.bestLabelFree < label_free
        if is_best_label_free:
            progress.bestLabelFree = label_free
        if progress.iteration >= progress.collapsedAt:  # a healthy checkpoint where it collapsed, or past it
            progress.rollbacksInARow = 0
        state = self.state_dict()
        utils.atomic_save(state, state_path(opt, progress.iteration))
        utils.atomic_save(state["options"], os.path.join(opt.outf, "options.pth"))
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
        opt, iteration = self.opt, self.progress.iteration
        if opt.rollback:
            return newest_first(set(checkpoint_files(opt.outf)) - {state_path(opt, iteration)})[opt.rollback:]
        return [state_path(opt, i) for i in range(max(iteration - opt.checkpointFreq, 1), iteration)
                if os.path.exists(state_path(opt, i))]

    def saved_options(self):
        """The options as the original saves them: with the iteration and the best validation IoU."""
        return argparse.Namespace(**dict(vars(self.opt), iteration=self.progress.iteration,
                                         bestValIoU=self.progress.bestValIoU))

    def state_dict(self):
        """The original's keys, and under 'resume' what continuing exactly needs."""
        state = {name: net.state_dict() for name, net in self.nets.items()}
        state.update({name: optimizer.state_dict() for name, optimizer in self.optimizers.items()})
        state["options"] = self.saved_options()
        state["resume"] = {
            "progress": asdict(self.progress),
            "genData": self.genData.state_dict(), "disData": self.disData.state_dict(),
            "sampleGrid": self.grid.state_dict(), "rng": utils.rng_states(),
            "datLines": {name: utils.count_lines(os.path.join(self.opt.outf, name))
                         for name in DAT_FILES + (monitor.STATS_FILE,)},
            **self.monitor.state_dict()}
        return state

    # -------------------------------------------------------------- every rank

    def follow(self, decision):
        """Every rank takes rank 0's decision at a checkpoint: its progress, its random states
        (its evaluation loaders drew from them) and its action."""
        if not self.dist.is_main:
            self.monitor.start_period()
        utils.restore_rng_states(decision["rng"])
        self.progress = Progress(**decision["progress"])
        if decision["action"] == "restart":
            self.restart()
        elif decision["action"] == "early_restart":
            self.progress.earlyRestarts += 1
            self.restart()
        elif decision["action"] == "rollback":
            self.rollback()

    def restart(self):
        """Fresh nets and optimizers after a collapse, drawing random numbers as the
        original does (its noise reconstructor is re-initialised in place); the data
        streams go on."""
        self.nets = self.build_nets(netRecZ=self.nets.netRecZ)
        self.optimizers = make_optimizers(self.nets, self.opt)
        self.modules = self.dist.step_modules(self.nets)
        self.progress.iteration = 0

    def rollback_target(self):
        """The checkpoint a rollback goes back to: the newest, or for each rollback in a row
        (before the run gets past the iteration it collapsed at) one further back, as far as
        the checkpoints go: a collapse is often under way by the last checkpoint before it."""
        files = newest_first(checkpoint_files(self.opt.outf))
        return files[min(self.progress.rollbacksInARow, len(files) - 1)]

    def rollback(self):
        """Back to rollback_target() after a collapse, with fresh noise and a fresh data order
        (seeded from --manualSeed and the rollback's number, alike on every rank), so that
        the same collapse is not replayed."""
        progress = self.progress
        path = self.rollback_target()
        state = utils.load_checkpoint(path, "cpu")
        progress.collapsedAt = max(progress.collapsedAt, progress.iteration)
        progress.rollbacks += 1
        progress.rollbacksInARow += 1
        self.load_nets_and_optimizers(path, state)
        progress.iteration = state["options"].iteration
        utils.seed_everything(utils.derived_seed(self.opt.manualSeed, progress.rollbacks))
        self.genData, self.disData = self.batch_stream(), self.batch_stream()

    def stop(self, signum):
        """Asked to stop (SIGINT, SIGTERM): a checkpoint of this very iteration, unless the
        period's checkpoint was just written, and one line on how to continue."""
        opt, iteration = self.opt, self.progress.iteration
        if self.dist.is_main:
            if iteration % opt.checkpointFreq:
                self.save_checkpoint()
            by = signal.Signals(signum).name if signum else "another process"
            if os.path.exists(state_path(opt, iteration)):
                print("stopped by %s at iteration %d: %s holds it; continue with: python train.py --resume --outf %s"
                      % (by, iteration, state_path(opt, iteration), opt.outf), file=sys.stderr)
            else:
                print("stopped by %s before training began" % by, file=sys.stderr)
            self.log(self.summary())
        self.dist.barrier()

    def summary(self):
        """One line for the end of the run: the best checkpoint, the last one, what to run next."""
        opt, progress = self.opt, self.progress
        last = next(iter(newest_first(checkpoint_files(opt.outf))), "none")
        val = utils.read_dat(os.path.join(opt.outf, "val.dat"))
        best = [iteration for iteration, _, iou in val if iou == progress.bestValIoU]
        label_free = [r["iteration"] for r in self.monitor.records if r["label_free"]["score"] == progress.bestLabelFree]
        unsupervised = os.path.join(opt.outf, BEST_LABEL_FREE)
        chosen = os.path.join(opt.outf, "best.pth") if best else unsupervised if label_free else last
        if best:
            verdict = "best validation IoU %.4f at iteration %d (%s)" % (progress.bestValIoU, best[0], chosen)
        elif val:
            verdict = "no validation IoU (no ground-truth masks), so no best.pth"
        else:
            verdict = "no checkpoint scored yet"
        if label_free:
            verdict += "; best label-free score %.3f at iteration %d (%s)" % (progress.bestLabelFree, label_free[-1],
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


def train(opt, start=None, dist=None):
    """ReDO's training, as the original: iterations until --nIteration; at the end of every
    period of --checkpointFreq iterations rank 0 judges the nets and decides (save and go on,
    or recover from a collapse or a start gone wrong) and every rank follows. A signal stops
    every rank at the same iteration, with a checkpoint. Returns the TrainingRun at its end."""
    dist = dist or Distributed()
    if dist.is_main:
        check_output_folder(opt.outf)
        if start is None and opt.overwrite:
            remove_run_files(opt.outf)
    dist.barrier()
    run = TrainingRun(opt, start, dist)
    stopped = False
    with StopRequest() as stop:
        while run.progress.iteration <= opt.nIteration:
            stopped = dist.any(stop.signal is not None)
            if stopped:
                break
            run.train_one_iteration()
            if run.progress.iteration % opt.checkpointFreq == 0:
                run.follow(dist.share(run.end_of_period() if dist.is_main else None))
        run.monitor.close()
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
            return StepModules.for_nets(nets)
        device = next(nets.netEncM.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return StepModules.for_nets(nets, lambda module: torch.nn.parallel.DistributedDataParallel(
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
