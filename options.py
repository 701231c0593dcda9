"""The command line of train.py: its flags, the options of a run resolved from them (or from
the checkpoint --resume continues), and the checks of those options made before any work."""
import argparse
import os
import random
import textwrap
from dataclasses import fields

import augment
import datasets
import models
import runfolder
import utils
from utils import UserError

RESTARTS_UNTIL = 7000  # the original restarts after a collapse up to this iteration, not later
EARLY_RESTARTS = 5  # at most, in a run: each costs a checkpoint period


PRESETS = {
    "cpu": dict(
        flags="--nf 8 --nfM 32 --batchSize 8 --lrM 2e-4 --dStepFreq 2 --autoRestart .05 --rollback 3 "
              "--earlyRestart .55 --checkpointFreq 100 --nTrainScore 200 --clean --cacheData --workers 1 --amp auto",
        purpose="a first run on a CPU: small nets (nf 8; netEncM 32, for its quarter-width layers), a faster "
                "netEncM (lrM 2e-4) against a discriminator stepped every other iteration, checkpoints every 100 "
                "iterations with the recoveries on, bfloat16 where the CPU does it fast",
        measured="synthetic, 2-core CPUs: val IoU 0.8 in 5-12 min (7 runs of 8), label-free choice 0.80-0.87 "
                 "test IoU (docs/quickstart.md)"),
    "cpu-photos": dict(
        flags="--nf 16 --nfM 32 --batchSize 8 --lrM 2e-4 --dStepFreq 2 --hflip --diffAugment translation,cutout "
              "--autoRestart .05 --rollback 3 --earlyRestart .55 --checkpointFreq 100 --nTrainScore 200 --clean "
              "--cacheData --workers 1",
        purpose="a few hundred of your own photos on a CPU: cpu's recipe with nf 16 and flips and DiffAugment "
                "against a discriminator that learns few images by heart; fp32 (in bf16 it trained 1.3-1.4x "
                "faster but learned less, docs/bf16.md)",
        measured="164 horse photos, seeds 1-3, 1 h on a 2-core CPU: best IoU 0.48-0.52, 0.05-0.09 above a "
                 "fixed ellipse (docs/own-photos.md)"),
    "paper": dict(
        flags={"flowers": "--nfX 32 --useSelfAttG --useSelfAttD --clean",
               "lfw": "--useSelfAttG --useSelfAttD --clean",
               "cub": "--useSelfAttG --useSelfAttD --clean --autoRestart .1"},
        purpose="the paper's runs for --dataset flowers, lfw or cub, as the authors give them (a GPU)",
        measured="the paper: Flowers 0.879 / 0.764, CUB 0.845 / 0.426 (accuracy / IoU); not measured here"),
}
"""--preset NAME: a group of flags; any flag given on the command line wins."""


def preset_flags(name, dataset):
    """The flags (a list of strings) --preset `name` sets for `dataset`."""
    if name not in PRESETS:
        raise UserError("--preset %s: unknown preset (expected one of %s)" % (name, ", ".join(PRESETS)))
    flags = PRESETS[name]["flags"]
    if isinstance(flags, dict):
        if dataset not in flags:
            raise UserError("--preset %s is made for --dataset %s, not %s" % (name, ", ".join(flags), dataset))
        flags = flags[dataset]
    return flags.split()


def apply_preset(opt, explicit):
    """opt with its preset's flags, except those given on the command line (`explicit`);
    returns the flags now set explicitly, the preset's included."""
    if opt.preset is None:
        return set(explicit)
    flags = preset_flags(opt.preset, opt.dataset)
    preset = make_parser().parse_args(flags)
    from_preset = explicit_flags(flags) - set(explicit)
    for name in from_preset:
        setattr(opt, name, getattr(preset, name))
    return set(explicit) | from_preset


def presets_table(width=100):
    """The presets, for --help's epilog: each one's purpose, flags and what it measured."""
    lines = []
    for name, preset in PRESETS.items():
        flags = preset["flags"]
        if isinstance(flags, dict):
            flags = "; ".join("%s: %s" % item for item in flags.items())
        lines += textwrap.wrap("%s: %s." % (name, preset["purpose"]), width, initial_indent="  ",
                               subsequent_indent="      ")
        for text in (flags, "measured: " + preset["measured"]):
            lines += textwrap.wrap(text, width, initial_indent="      ", subsequent_indent="      ",
                                   break_on_hyphens=False)
    return "\n".join(lines)


EPILOG = """presets (--preset NAME; any flag given wins):
%s

examples:
  python train.py --dataset synthetic --outf out --preset cpu          # no download; a CPU
  python train.py --dataset folder --dataroot my_images --outf out --preset cpu-photos
  python train.py --dataset flowers --dataroot FLOWERS --outf out --preset paper   # a GPU
  torchrun --nproc_per_node=4 train.py ...  (--batchSize is the global batch; README, torchrun)
"""


def make_parser():
    p = argparse.ArgumentParser(description="Train ReDO (unsupervised object segmentation by redrawing).",
                                formatter_class=utils.HelpFormatter, epilog=EPILOG % presets_table())
    group = p.add_argument_group("preset")
    group.add_argument('--preset', default=None, metavar='NAME',
                       help="set a group of flags (below): %s (default: none, the original's defaults)"
                            % " | ".join(PRESETS))

    group = p.add_argument_group("data")
    group.add_argument('--dataset', default="flowers",
                       help='flowers | cub | lfw | cmnist | synthetic (built in, no download) | folder (your images) '
                            '| lfw+flowers (--dataroot LFW_ROOT,FLOWERS_ROOT)')
    group.add_argument('--dataroot', default='./data', help='path to dataset')
    group.add_argument('--maskroot', default=None,
                       help='--dataset folder: folder of ground-truth masks (default: none, no best.pth)')
    group.add_argument('--sizex', type=int, default=128,
                       help='size of the input image: 128 (the original) or 64 (a quarter of the pixels, for CPUs)')
    group.add_argument('--nx', type=int, default=3, help='number of channels of the input image')
    group.add_argument('--batchSize', type=int, default=20, help='input batch size (under torchrun: the global batch)')
    group.add_argument('--workers', type=int, default=4, help='number of data loading workers')
    group.add_argument('--nTest', type=int, default=5, help='number of test images shown in the sample grids')
    group.add_argument('--nTrainScore', type=int, default=0,
                       help='score only the first N training images at each checkpoint (train.dat, the collapse '
                            'test); 0: the whole split, as the original')

    group = p.add_argument_group("networks")
    group.add_argument('--nMasks', type=int, default=2, help='number of masks (regions)')
    group.add_argument('--nz', type=int, default=32, help='size of the latent z vector')
    group.add_argument('--nf', type=int, default=64, help='base number of filters for conv nets')
    group.add_argument('--nfD', type=int, default=None, help='nf for netDX (default: --nf)')
    group.add_argument('--nfX', type=int, default=None, help='nf for netGenX (default: --nf)')
    group.add_argument('--nfM', type=int, default=None, help='nf for netEncM (default: --nf)')
    group.add_argument('--nfZ', type=int, default=None, help='nf for netRecZ (default: --nf)')
    group.add_argument('--nResM', type=int, default=3, help='number of residual blocks in netEncM')
    group.add_argument('--useSelfAttD', action='store_true', help='use self attention in netDX')
    group.add_argument('--useSelfAttG', action='store_true', help='use self attention in netGenX')
    group.add_argument('--temperature', type=float, default=1, help="softmax temperature of netEncM's masks")
    group.add_argument('--initOrthoGain', type=float, default=.8, help='gain for the orthogonal initialization')
    group.add_argument('--skipOrthoInitSN', action='store_true',
                       help="leave spectral-norm layers at PyTorch's default init, as the original's GPU runs "
                            "did (README, Differences)")

    group = p.add_argument_group("optimisation")
    group.add_argument('--nIteration', type=int, default=50000, help='number of iterations')
    group.add_argument('--lrG', type=float, default=1e-4, help='learning rate of the region generators (netGenX)')
    group.add_argument('--lrM', type=float, default=1e-5, help='learning rate of the mask extractor (netEncM)')
    group.add_argument('--lrD', type=float, default=1e-4, help='learning rate of the discriminator (netDX)')
    group.add_argument('--lrZ', type=float, default=1e-4, help='learning rate of the noise reconstructor (netRecZ)')
    group.add_argument('--wdecay', type=float, default=1e-4, help='weight decay of the mask extractor (netEncM)')
    group.add_argument('--wrecZ', type=float, default=5, help='weight of the z reconstruction loss (0: no netRecZ)')
    group.add_argument('--gStepFreq', type=int, default=1, help='update the generator side every x iterations')
    group.add_argument('--dStepFreq', type=int, default=1, help='update netDX every x iterations')
    group.add_argument('--manualSeed', type=int, help='manual seed (default: drawn at random, and saved)')

    group = p.add_argument_group("checkpoints and recovery")
    group.add_argument('--outf', default='.', help='folder to output images and model checkpoints')
    group.add_argument('--checkpointFreq', type=int, default=500, help='frequency of checkpoints')
    group.add_argument('--clean', action=argparse.BooleanOptionalAction, default=False,
                       help='delete the previous checkpoint when saving one (kept by --resume; --no-clean to stop)')
    group.add_argument('--resume', nargs='?', const=True, default=False, type=resume_mode,
                       help='resume from the last checkpoint in --outf; "--resume auto": continue the run in --outf '
                            'if it has a checkpoint, else start it (one command for a scheduler that requeues it)')
    group.add_argument('--iteration', type=int, default=0,
                       help="start from OUTF/state_N.pth with this command's options (the original's resume); "
                            "0: a new run")
    group.add_argument('--overwrite', action='store_true',
                       help="start a new run in an --outf that holds another run's files, removing them first")
    group.add_argument('--autoRestart', type=float, default=0,
                       help='restart training if the ratio "size of region" / "size of image" is strictly '
                            'smaller than x on train and val at a checkpoint (collapse detected); 0: off')
    group.add_argument('--rollback', type=int, default=0,
                       help='after a collapse (the --autoRestart test, at any iteration), go back to the newest '
                            'checkpoint (one further back for each rollback before the run gets past the collapse) '
                            'and go on with fresh noise and data order, at most this many times; then '
                            '--autoRestart as the original. --clean keeps this many checkpoints more')
    group.add_argument('--earlyRestart', type=float, default=0,
                       help='restart from scratch when the found-again score (label-free) at the first checkpoint '
                            'of a start is under x (netEncM does not find again the regions it had redrawn: a start '
                            'gone wrong), at most %d times; 0: off' % EARLY_RESTARTS)
    group.add_argument('--silent', action='store_true', help='silent execution')
    group.add_argument('--tensorboard', action='store_true',
                       help='also write the statistics and sample grids for TensorBoard in OUTF/tensorboard '
                            '(pip install tensorboard)')

    group = p.add_argument_group("speed")
    group.add_argument('--device', default=None,
                       help='cpu | cuda | cuda:N (default: cuda if available, else cpu)')
    group.add_argument('--amp', default='none', choices=['none', 'bf16', 'auto'],
                       help='mixed precision for the training iterations: bf16 autocast (CPU and CUDA); auto: bf16 '
                            'on CPUs with native bfloat16 (AMX or AVX512-BF16), fp32 elsewhere (docs/bf16.md)')
    group.add_argument('--compile', action='store_true',
                       help='compile the nets with torch.compile: minutes of compiling (docs/speed.md)')
    group.add_argument('--cacheData', action='store_true',
                       help='decode and resize the dataset once and keep it in memory (same images)')

    group = p.add_argument_group("augmentation (few images)")
    group.add_argument('--hflip', action='store_true',
                       help='flip half of the training images left to right, at random')
    group.add_argument('--diffAugment', type=augment.policy, default=(), metavar='T1,T2',
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

    --preset NAME sets its flags, except those given (`explicit`). --resume takes the options
    saved in the newest complete checkpoint of --outf, except those of RESUME_OVERRIDES (a
    preset's flags count as given). --iteration N starts from OUTF/state_N.pth with the command
    line's options.
    """
    start = None
    if opt.overwrite and opt.resume:
        raise UserError("--overwrite starts a new run in --outf: it cannot go with --resume")
    explicit = apply_preset(opt, explicit)
    if opt.resume is True or (opt.resume == "auto" and runfolder.checkpoint_files(opt.outf)):
        path, state = runfolder.latest_checkpoint(opt.outf, "cpu")
        saved = complete_options(argparse.Namespace(**vars(state["options"])))  # a copy: the state keeps its own
        # a preset is compared by its expanded flags, and by its name when the run has one
        given = sorted(explicit - set(RESUME_OVERRIDES) - {"resume", "iteration", "overwrite"}
                       - (set() if saved.preset else {"preset"}))
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
    argv = [str(f) for f in flags]
    return resolve_options(make_parser().parse_args(argv), explicit_flags(argv))[0]


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

