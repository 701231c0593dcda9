"""What a run tells of itself: the losses and speed of the period under way, and at each
checkpoint a record in stats.jsonl, curves.png redrawn, the sample grid out_%05d.png,
TensorBoard (--tensorboard), a summary line on stdout and the peak memory (README, "What a
run writes"; docs/stats.md)."""
import json
import math
import os
import time

import torch
import torchvision.utils as vutils
from tqdm import tqdm

import datasets
import models
import runfolder
from utils import UserError, append_line, atomic_write, remove_if_present, truncate_lines, warn

STATS_FILE = runfolder.STATS
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
    label_free.plot(steps, [r["label_free"]["score"] for r in records], "-", color="black",
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
    # margins set once rather than tight_layout, which measures every label at every checkpoint
    fig.subplots_adjust(left=0.09, right=0.91, bottom=0.05, top=0.99, hspace=0.06)
    return fig


def tensorboard_writer(outf, purge_step=None):
    """A SummaryWriter on OUTF/tensorboard; TensorBoard is an optional dependency."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)") from None
    return SummaryWriter(os.path.join(outf, runfolder.TENSORBOARD), purge_step=purge_step)


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
        z = models.draw_noise(opt.nTest, opt.nMasks, opt.nz, device)
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
        atomic_write(path, lambda f: vutils.save_image(picture, f, format="png"))
        return picture


def peak_memory_mb(device):
    """The most memory the run has held: on the GPU, by its tensors; on the CPU, the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


class Monitor:
    """One run's record of itself. Every rank sums its period's losses; rank 0 (`writes`)
    writes the files: at each checkpoint a record in stats.jsonl, curves.png, TensorBoard and
    the summary line. Saved in the checkpoint (state_dict) so that a resumed run's log goes on
    as if it had never stopped."""

    def __init__(self, opt, device, log, writes, records=()):
        self.outf, self.batch_size, self.threshold = opt.outf, opt.batchSize, opt.autoRestart
        self.device, self.log = device, log
        self.period_length, self.show_bar = opt.checkpointFreq, writes and not opt.silent
        self.bar = None  # the period's progress bar, once it has begun
        self.records = list(records)
        self.events = []  # what happened since the last record: "resume", and the checkpoint's action
        self.writer = None
        if opt.tensorboard and writes:
            self.writer = tensorboard_writer(self.outf, self.records[-1]["step"] + 1 if self.records else None)
        self.start_period()

    @classmethod
    def resumed(cls, opt, device, log, writes, resume):
        """A resumed run's: stats.jsonl back to the checkpoint's record, and the period it was
        saved in (a stop between two checkpoints) going on."""
        records = []
        if writes and resume["stats"] is not None:
            records = continue_stats(os.path.join(opt.outf, STATS_FILE), resume["datLines"][STATS_FILE],
                                     resume["stats"])
        elif writes:
            remove_if_present(os.path.join(opt.outf, STATS_FILE))  # saved before the first record
        monitor = cls(opt, device, log, writes, records)
        monitor.period_losses.load_state_dict(resume["period"]["losses"])
        monitor.period_iterations = resume["period"]["iterations"]
        monitor.period_start -= resume["period"]["seconds"]
        return monitor

    def start_period(self):
        self.close_bar()
        self.period_losses = PeriodLosses()
        self.period_iterations = 0
        self.period_start = time.perf_counter()

    def add(self, losses, iteration):
        """An iteration's losses (tensors, read only at the end of the period or, every ten
        iterations, for the progress bar)."""
        self.period_losses.add(losses)
        self.period_iterations += 1
        if self.show_bar:
            self.bar = self.bar or tqdm(total=self.period_length)
            self.bar.update(1)
            if iteration % 10 == 0:
                self.bar.set_postfix({name: "%.3f" % v for name, v in self.period_losses.last_values().items()})

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def period_seconds(self):
        return time.perf_counter() - self.period_start

    def state_dict(self):
        """What the checkpoint keeps of the log: its last record and the period under way."""
        return {"stats": self.records[-1] if self.records else None,
                "period": {"iterations": self.period_iterations, "losses": self.period_losses.state_dict(),
                           "seconds": self.period_seconds()}}

    def record(self, iteration, scores, label_free, action, grid, seconds):
        """The period's record, written everywhere; then a new period begins. seconds: the
        period's "training", "scoring" (the splits, the label-free score, the grid, the
        decision) and "label_free" times."""
        previous = self.records[-1] if self.records else {"step": 0, "seconds": 0.0}
        record = {
            "iteration": iteration, "step": previous["step"] + self.period_iterations,
            "seconds": round(previous["seconds"] + seconds["training"] + seconds["scoring"], 3),
            "period_seconds": round(seconds["training"], 3), "score_seconds": round(seconds["scoring"], 3),
            "iterations_per_second": round(self.period_iterations / seconds["training"], 4),
            "images_per_second": round(self.period_iterations * self.batch_size / seconds["training"], 3),
            "losses": self.period_losses.summary(),
            "region_sizes": {split: [round(size, 5) for size in s.region_sizes] for split, s in scores.items()},
            **{"%s_%s" % (split, key): json_number(getattr(s, key))
               for split, s in scores.items() for key in ("acc", "iou")},
            "label_free": label_free._asdict(),
            "label_free_seconds": round(seconds["label_free"], 3),
            "events": self.events + ([action] if action else []),
            "peak_memory_mb": json_number(peak_memory_mb(self.device))}
        append_line(os.path.join(self.outf, STATS_FILE), json.dumps(record))
        self.records.append(record)
        self.events = []
        self.start_period()
        plot_curves(self.records, os.path.join(self.outf, runfolder.CURVES), self.threshold)
        if self.writer is not None:
            for name, value in flat_scalars(record).items():
                self.writer.add_scalar(name, value, record["step"])
            self.writer.add_image("sample_grid", grid, record["step"])
            self.writer.flush()
        self.log(summary_line(record))

    def close(self):
        self.close_bar()
        if self.writer is not None:
            self.writer.close()
