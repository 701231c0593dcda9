"""What every script shares: device choice, safe checkpoint loading, evaluate()."""
import argparse
import contextlib
import io
import itertools
import json
import math
import os
import pickle
import random
import sys
import tarfile
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import models

MAX_ARCHIVE_MEMBER_BYTES = 2 << 30  # the published .pth files are at most a few hundred MB


class UserError(Exception):
    """A problem with the user's input: the scripts print it as one line and exit non-zero."""


def user_error_message(error):
    """The one-line message of a UserError, also when a DataLoader worker raised it (the
    loader re-raises it with the worker's traceback in the message)."""
    message = str(error)
    if "Original Traceback" in message:
        message = message.rstrip().splitlines()[-1].split("UserError: ", 1)[-1]
    return message


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, where it has one (not None, not an unset switch, not
    an empty list)."""

    def _get_help_string(self, action):
        if action.default in (None, False, ()):
            return action.help
        return super()._get_help_string(action)


def is_main_process():
    """Rank 0 under torchrun (which sets RANK before the process starts), or a plain run."""
    return int(os.environ.get("RANK", "0")) == 0


def warn(message):
    """A warning on stderr, printed by one process only under torchrun (rank 0)."""
    if is_main_process():
        print("warning: %s" % message, file=sys.stderr)


def resolve_device(name=None):
    """The device to run on, as a string: `name` (cpu, cuda, cuda:N) checked, or CUDA when
    available, else the CPU."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError("--device %s: expected cpu, cuda or cuda:N" % name) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device %s: CUDA is not available on this machine (use --device cpu)" % name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError("--device %s: this machine has %d CUDA devices" % (name, torch.cuda.device_count()))
    return name


# ----------------------------------------------------------------------------- checkpoints

def _read_archived_pth(path):
    """The bytes of the one .pth file inside a .tar.gz, read in memory (never extracted to
    disk), refusing members that point outside the archive or are larger than a checkpoint."""
    try:
        with tarfile.open(path, "r:*") as archive:
            members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".pth")]
            unsafe = [m.name for m in members if os.path.isabs(m.name) or ".." in m.name.split("/")]
            if unsafe:
                raise UserError("%s: refused: archive member %s points outside the archive" % (path, unsafe[0]))
            if len(members) != 1:
                raise UserError("%s: expected an archive holding exactly one .pth file, found %d"
                                % (path, len(members)))
            if members[0].size > MAX_ARCHIVE_MEMBER_BYTES:
                raise UserError("%s: archive member %s is %d bytes, more than a ReDO checkpoint can be"
                                % (path, members[0].name, members[0].size))
            return archive.extractfile(members[0]).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError("%s: not a readable .tar.gz archive (%s)" % (path, e)) from None


def safe_torch_load(source, path, device="cpu"):
    """torch.load that unpickles only tensors, plain containers and argparse.Namespace."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(source, map_location=torch.device(device), weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError("%s: refused to load: it holds objects other than tensors and options, "
                        "which could run code (%s)" % (path, str(e).splitlines()[0])) from None
    except Exception as e:  # torch.load raises many kinds of errors on a damaged file
        raise UserError("%s: not a readable PyTorch checkpoint (%s)"
                        % (path, str(e).splitlines()[0] if str(e) else type(e).__name__)) from None


def load_checkpoint(path, device="cpu"):
    """Load a ReDO checkpoint (.pth, or the .tar.gz archive the published weights come in).

    Files saved by PyTorch 1.0 (legacy format) load as well as ours. Only tensors, plain
    containers and argparse.Namespace are unpickled (weights_only=True); everything is
    mapped to `device` (the published weights were saved from cuda:0).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError("%s: no such checkpoint file" % path)
    source = io.BytesIO(_read_archived_pth(path)) if tarfile.is_tarfile(path) else path
    state = safe_torch_load(source, path, device)
    if not isinstance(state, dict) or "options" not in state:
        raise UserError("%s: not a ReDO checkpoint (expected a dict with 'options' and nets)" % path)
    return state


def option_differences(opt, other, keys, other_name="other"):
    """'key=value (other_name: value)' for each of keys on which two sets of options differ."""
    return ["%s=%s (%s: %s)" % (key, getattr(opt, key, None), other_name, getattr(other, key, None))
            for key in keys if getattr(opt, key, None) != getattr(other, key, None)]


def load_nets(state, names, device="cpu", path="checkpoint"):
    """Build the named nets from a checkpoint's options and load their weights strictly, in eval mode."""
    opt = state["options"]
    nets = models.ReDONets()
    for name in names:
        if name not in state:
            raise UserError("%s: has no %s (it holds %s)" % (path, name, ", ".join(k for k in state if k.startswith("net"))))
        net = models.build_net(name, opt, device)
        try:
            net.load_state_dict(state[name], strict=True)
        except RuntimeError as e:
            raise UserError("%s: %s does not fit the configuration in its options: %s"
                            % (path, name, str(e).splitlines()[1].strip() if "\n" in str(e) else e)) from None
        setattr(nets, name, net.eval())
    return nets


# ----------------------------------------------------------------------------- evaluation

@contextlib.contextmanager
def eval_mode(*nets):
    """Put nets in eval mode for a block, then restore each one's mode."""
    modes = [net.training for net in nets]
    for net in nets:
        net.eval()
    try:
        yield
    finally:
        for net, mode in zip(nets, modes):
            net.train(mode)


def foreground_assignments(nMasks):
    """Every way to call some of the regions foreground and the others background (not all, not none)."""
    return [subset for r in range(1, nMasks) for subset in itertools.combinations(range(nMasks), r)]


def segmentation_scores(mPred, mData):
    """Per-image accuracy and IoU of soft masks mPred (B, K, H, W) against binary ground truth
    mData (B, 1, H, W), each the best over the ways of assigning regions to the foreground.

    A pixel belongs to the region with the largest mask (the first on ties). For K = 2 the
    two assignments are {region 0} (mPred[:, 0] >= .5) and {region 1} (mPred[:, 0] < .5):
    the original's score exactly. IoU is NaN for an image where both masks are empty.
    """
    region = mPred.argmax(1, keepdim=True)
    accs, ious = [], []
    for subset in foreground_assignments(mPred.size(1)):
        pred = torch.isin(region, torch.tensor(subset, device=region.device)).float()
        accs.append((pred == mData).float().mean((-1, -2)))
        ious.append(((pred + mData) == 2).float().sum((-1, -2)) / ((pred + mData) >= 1).float().sum((-1, -2)))
    return torch.stack(accs).amax(0).squeeze(1), torch.stack(ious).amax(0).squeeze(1)


def min_region_size(mPred):
    """The smallest average soft-mask size of a region: near 0 when training has collapsed."""
    return mPred.mean((0, 2, 3)).min().item()


def has_collapsed(min_region_sizes, threshold):
    """The --autoRestart test, as the original: the smallest region is under `threshold`
    (strictly) on every split scored (train and val), not on one only: a batch of small
    objects is not a collapse."""
    return all(size < threshold for size in min_region_sizes)


class LabelFreeScores(NamedTuple):
    """What the nets and the images say of netEncM's masks, without labels (see label_free_scores)."""
    score: float
    refound: float
    edges: float
    realism: float
    binariness: float
    min_region_size: float


def label_free_scores(nets, images, z, batch_size):
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
            region = masks.argmax(1)  # (B, H, W)
            regions = F.one_hot(region, k)  # (B, H, W, K)
            _, composites = models.redraw(nets.netGenX, x, regions.permute(0, 3, 1, 2).to(x.dtype),
                                          z[start:start + batch_size].to(device))
            real.append(nets.netDX(x).flatten())
            fake.append(nets.netDX(composites.flatten(0, 1)).flatten())
            regions = regions.unsqueeze(1).bool()  # (B, 1, H, W, K): against each composite
            found = F.one_hot(nets.netEncM(composites.flatten(0, 1)).argmax(1), k).bool()
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


# ----------------------------------------------------------------------------- writing files

def atomic_write(path, write):
    """Write a file so that it is either complete or absent/unchanged: write(f) fills a
    temporary file in the same folder, which is flushed to disk and then renamed over path.
    A failure of the file system (a full disk) is a UserError naming the file."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, ".%s.tmp%d" % (os.path.basename(path), os.getpid()))
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        cause = os_error_behind(e)
        if cause is None:
            raise
        raise UserError("%s: cannot write it (%s); the files already there are unchanged"
                        % (path, cause.strerror or cause)) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def os_error_behind(error):
    """The OSError that caused `error`, if any: torch.save reports a full disk as a
    RuntimeError raised while handling the OSError."""
    while error is not None and not isinstance(error, OSError):
        error = error.__context__
    return error


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def append_line(path, line):
    """Append a line to a small text file (train.dat, val.dat), atomically."""
    old = b""
    if os.path.exists(path):
        with open(path, "rb") as f:
            old = f.read()
    atomic_write(path, lambda f: f.write(old + line.encode() + b"\n"))


def load_options(path):
    """The options (argparse.Namespace) saved in OUTF/options.pth."""
    opt = safe_torch_load(path, path)
    if not isinstance(opt, argparse.Namespace):
        raise UserError("%s: expected saved training options (an argparse.Namespace)" % path)
    return opt


def read_dat(path):
    """The rows of train.dat or val.dat, [iteration, accuracy, IoU] (none if there is no file)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [[int(row[0]), float(row[1]), float(row[2])] for row in (line.split() for line in f) if row]


def count_lines(path):
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return len(f.read().splitlines())


def truncate_lines(path, n):
    """Keep the first n lines: what was written after the checkpoint we resume from goes."""
    if count_lines(path) > n:
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)[:n]
        atomic_write(path, lambda f: f.write(b"".join(lines)))


# ----------------------------------------------------------------------------- random number generators

def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def rng_states(cuda=torch.cuda):
    """Every generator a run draws from, in a form that loads with weights_only=True: with
    CUDA, each GPU's generator too (`cuda`: torch.cuda, or a stand-in for tests)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                        "gauss": gauss}}
    if cuda.is_available():
        states["cuda"] = cuda.get_rng_state_all()
    return states


def restore_rng_states(states, cuda=torch.cuda):
    """Set every generator as rng_states() found it. GPU states are restored on the GPUs
    that exist (a run saved on a GPU machine resumes on the CPU, or on fewer GPUs)."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in states and cuda.is_available():
        for index, state in enumerate(states["cuda"][:cuda.device_count()]):
            cuda.set_rng_state(state, index)


# ----------------------------------------------------------------------------- training statistics

STATS_FILE = "stats.jsonl"
LOSS_NAMES = ("lossG", "lossD", "err_recZ")
# the events that end a period without a checkpoint, and how curves.png marks them
EVENT_LINES = {"rollback": "--", "restart": ":", "early_restart": ":"}


class PeriodLosses:
    """The losses of a checkpoint period, summed where they were computed (no synchronisation
    with a GPU at each iteration): the mean and the last value of each."""

    def __init__(self):
        self.sums, self.counts, self.last = {}, {}, {}

    def add(self, losses):
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0) + value.float()
            self.counts[name] = self.counts.get(name, 0) + 1
            self.last[name] = value

    def state_dict(self):
        return {"sums": dict(self.sums), "counts": dict(self.counts), "last": dict(self.last)}

    def load_state_dict(self, state):
        self.sums, self.counts, self.last = dict(state["sums"]), dict(state["counts"]), dict(state["last"])

    def last_values(self):
        return {name: value.item() for name, value in self.last.items()}

    def summary(self):
        return {name: {"mean": (self.sums[name] / self.counts[name]).item(), "last": self.last[name].item()}
                for name in LOSS_NAMES if name in self.sums}


def json_number(value):
    """NaN (no ground truth) is null in JSON."""
    return None if value is None or math.isnan(value) else value


def read_stats(path):
    """The records of a stats.jsonl, and whether every line of it was a complete record."""
    if not os.path.exists(path):
        return [], False
    records = []
    with open(path, "rb") as f:
        for line in f.read().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                return records, False
    return records, True


def continue_stats(path, kept_lines, own_record):
    """On resume: stats.jsonl as it was when the checkpoint was saved (its first kept_lines
    records, the last being the checkpoint's own record). A missing or damaged file is one
    warning; the log then continues from the records that could be read, up to the
    checkpoint's own record (kept in the checkpoint), which is written again."""
    records, whole = read_stats(path)
    if whole and len(records) >= kept_lines and records[kept_lines - 1:kept_lines] == [own_record]:
        truncate_lines(path, kept_lines)
        return records[:kept_lines]
    warn("%s: %s; continuing it from the checkpoint's own record" % (path, "missing" if not os.path.exists(path) else
                                                                      "damaged or not this run's"))
    records = [r for r in records if r.get("step", math.inf) < own_record["step"]] + [own_record]
    atomic_write(path, lambda f: f.write(b"".join(json.dumps(r).encode() + b"\n" for r in records)))
    return records


def plot_curves(records, path, threshold=0.0):
    """curves.png (curves_figure)."""
    fig = curves_figure(records, threshold)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))


def curves_figure(records, threshold=0.0):
    """The period means of the losses, each region's mean size on train and validation (with
    the --autoRestart threshold), and accuracy / IoU / label-free score, against iterations
    trained (counted on across restarts and rollbacks, marked by dotted and dashed lines)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 9))
    FigureCanvasAgg(fig)
    losses, sizes, scores = fig.subplots(3, 1, sharex=True)
    steps = [r["step"] for r in records]
    for name in LOSS_NAMES:
        if any(name in r["losses"] for r in records):
            losses.plot(steps, [r["losses"].get(name, {}).get("mean") for r in records], ".-", label=name)
    losses.set_ylabel("loss (period mean)")
    for split, style in (("train", ":"), ("val", "-")):
        for k in range(len(records[0]["region_sizes"][split])):
            sizes.plot(steps, [r["region_sizes"][split][k] for r in records], style, color="C%d" % k,
                       label="region %d, %s" % (k, split))
    if threshold > 0:
        sizes.axhline(threshold, color="red", linewidth=0.8, label="--autoRestart")
    sizes.set_ylabel("mean soft-mask size")
    sizes.set_ylim(0, 1)
    for key, style in (("val_iou", "-"), ("val_acc", "--"), ("train_iou", ":")):
        scores.plot(steps, [r[key] if r[key] is not None else math.nan for r in records], style, label=key)
    scores.set_ylabel("accuracy / IoU")
    scores.set_ylim(0, 1)
    label_free = scores.twinx()  # the score is not a fraction: its own scale, on the right
    label_free.plot(steps, [r.get("label_free", {}).get("score", math.nan) for r in records], "-", color="black",
                    linewidth=0.8, label="label-free score")
    label_free.set_ylabel("label-free score")
    label_free.set_ylim(bottom=0)
    label_free.legend(fontsize=7, loc="lower right")
    scores.set_xlabel("iterations trained")
    for axes in (losses, sizes, scores):
        for r in records:
            for event, style in EVENT_LINES.items():
                if event in r["events"]:
                    axes.axvline(r["step"], color="red", linestyle=style, linewidth=1)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def tensorboard_writer(outf, purge_step=None):
    """A SummaryWriter on OUTF/tensorboard; TensorBoard is an optional dependency."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)") from None
    return SummaryWriter(os.path.join(outf, "tensorboard"), purge_step=purge_step)


def flat_scalars(record, prefix=""):
    """'losses/lossG/mean': value, ... for every number of a stats record."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flat_scalars(value, prefix + key + "/"))
        elif isinstance(value, list):
            out.update({"%s%s/%d" % (prefix, key, k): v for k, v in enumerate(value) if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("iteration", "step"):
            out[prefix + key] = value
    return out
