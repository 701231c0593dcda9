"""The command line of train.py: its flags, the options of a run resolved from them (or from
the checkpoint --resume continues), and the checks of those options made before any work."""
import argparse
import os
import random
from dataclasses import fields

import augment
import datasets
import models
import runfolder
import utils
from utils import UserError

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
    if opt.resume is True or (opt.resume == "auto" and runfolder.checkpoint_files(opt.outf)):
        path, state = runfolder.latest_checkpoint(opt.outf, "cpu")
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
        for field in fields(runfolder.Progress):  # the run's, not options: TrainingRun reads them
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
        runfolder.check_no_other_run(opt)
    if start is None and opt.iteration > 0:
        path = runfolder.state_path(opt.outf, opt.iteration)
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
    utils.check_same_options(opt, saved, given, "the run",
                             "--resume auto: %s belongs to a run of another configuration: " % path,
                             "; continue it with --resume (its own options), or use another --outf")


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

