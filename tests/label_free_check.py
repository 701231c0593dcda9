"""How well the label-free score chooses checkpoints (README, "Choosing a checkpoint without
labels"); not collected by pytest.

    # a dataset made unlike --dataset synthetic, to check the score on data it was not designed on
    python tests/label_free_check.py blobs DIR
    python train.py --dataset folder --dataroot DIR/train/images --maskroot DIR/train/masks ... --outf RUN
    # per run: Spearman correlation of the score (and of the other parts logged) with validation
    # IoU over its checkpoints, minutes to a validation IoU of 0.8, collapses, and the test IoU
    # of best_unsupervised.pth, best.pth and the last checkpoint: a Markdown table
    python tests/label_free_check.py report RUN [RUN ...] [--test-folder DIR/test]
    # the checkpoints a finished run kept, scored again with this code: what it chooses
    python tests/label_free_check.py rescore RUN [RUN ...] [--test-folder DIR/test]

`blobs` writes DIR/{train,test}/{images,masks}: 2000 and 2000 images (the held-out tenth of
DIR/test, 200 images, is the test set), each a smooth many-coloured noise background with
a shaded blob of random outline, size and place, as JPEG with PNG masks.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import datasets  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402


# ----------------------------------------------------------------------------- the blobs dataset

def smooth_noise(rng, n, cells):
    """(n, n) values in [0, 1], bilinear interpolation of a random (cells+1)^2 grid."""
    grid = rng.uniform(0, 1, (cells + 1, cells + 1))
    t = np.linspace(0, cells, n, endpoint=False)
    i, f = t.astype(int), t % 1
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None] + rows[:, i + 1] * f[None]


def blob_scene(rng, n=128):
    """A background of three colours mixed by smooth noise at two scales, and a blob (star-
    shaped outline of 2 to 5 harmonics, 6% to 35% of the image) shaded as if lit from one
    side, in a colour at least 0.5 (L1) from the background's mean."""
    colours = rng.uniform(0, 1, (3, 3))
    weights = np.stack([smooth_noise(rng, n, 3) + 0.5 * smooth_noise(rng, n, 9) for _ in range(3)])
    weights = np.exp(4 * weights)
    background = np.einsum("khw,kc->hwc", weights / weights.sum(0), colours)
    while True:
        colour = rng.uniform(0, 1, 3)
        if np.abs(colour - background.mean((0, 1))).sum() > 0.5:
            break
    yy, xx = (np.mgrid[:n, :n] + 0.5) / n
    area = rng.uniform(0.06, 0.35)
    radius = np.sqrt(area / np.pi)
    cx, cy = rng.uniform(radius, 1 - radius, 2)
    angle, dist = np.arctan2(yy - cy, xx - cx), np.hypot(yy - cy, xx - cx)
    harmonics = rng.integers(2, 6)
    outline = 1 + sum(rng.uniform(0, 0.25) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
                      for k in range(2, 2 + harmonics))
    mask = dist < radius * outline / 1.1
    light = rng.uniform(0, 2 * np.pi)
    shade = 0.75 + 0.25 * np.cos(angle - light) * np.clip(dist / radius, 0, 1)
    image = np.where(mask[..., None], colour * shade[..., None], background)
    image = np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1)
    return (image * 255).astype(np.uint8), mask


def make_blobs(root, n=2000, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        image, mask = blob_scene(rng)
        for kind, array, ext in (("images", image, "jpg"), ("masks", mask.astype(np.uint8) * 255, "png")):
            os.makedirs(os.path.join(root, kind), exist_ok=True)
            Image.fromarray(array).save(os.path.join(root, kind, "%05d.%s" % (i, ext)), quality=95)


# ----------------------------------------------------------------------------- the report

UNSAVED_EVENTS = tuple(utils.EVENT_LINES)  # a period that ends in one keeps no checkpoint


def saved_records(records):
    """The records of the checkpoints a run kept (not those it found collapsed)."""
    return [r for r in records if not set(UNSAVED_EVENTS) & set(r["events"])]


def spearman(records, key):
    """Rank correlation over the checkpoints of the label-free `key` with the validation IoU."""
    return stats.spearmanr([r["label_free"][key] for r in records], [r["val_iou"] for r in records]).statistic


def first_reaching(records, iou):
    """'minutes (iteration)' of training until the validation IoU first reached iou."""
    for r in records:
        if r["val_iou"] >= iou:
            return "%.1f (%d)" % (r["seconds"] / 60, r["iteration"])
    return "never"


def test_iou(path, opt, test_folder):
    """Test IoU of a checkpoint, as example_load_pretrained.py --score prints it."""
    command = [sys.executable, os.path.join(ROOT, "example_load_pretrained.py"), "--statePath", path, "--score"]
    if test_folder:
        command += ["--dataset", "folder", "--dataroot", os.path.join(test_folder, "images"),
                    "--maskroot", os.path.join(test_folder, "masks"), "--split", "val"]
    else:
        command += ["--dataset", opt.dataset, "--split", "test"] + (["--dataroot", opt.dataroot]
                                                                     if opt.dataroot else [])
    with tempfile.TemporaryDirectory() as scratch:  # for the sample grid it also writes
        output = subprocess.run(command + ["--out", os.path.join(scratch, "out.png")], capture_output=True,
                                text=True, check=True).stdout
    return float(re.search(r"IoU ([0-9.]+)", output).group(1))


COMPARED = ("score", "refound", "edges", "realism", "binariness")


def report(runs, test_folder):
    print("| run | checkpoints | Spearman with val IoU: %s | val IoU 0.8 first: minutes (iteration) | rollbacks, "
          "restarts, early restarts | test IoU (iteration): best_unsupervised.pth | best.pth | last |"
          % ", ".join(COMPARED))
    print("|" + " --- |" * 8)
    pooled = []
    for run in runs:
        records, _ = utils.read_stats(os.path.join(run, utils.STATS_FILE))
        saved = saved_records(records)
        pooled += saved
        events = [event for r in records for event in r["events"]]
        row = [run, str(len(saved)), " / ".join("%.2f" % spearman(saved, key) for key in COMPARED),
               first_reaching(records, 0.8),
               ", ".join(str(events.count(event)) for event in UNSAVED_EVENTS)]
        last = train.newest_first(train.checkpoint_files(run))[0]
        for path in (os.path.join(run, train.BEST_LABEL_FREE), os.path.join(run, "best.pth"), last):
            opt = train.complete_options(utils.load_checkpoint(path, "cpu")["options"])
            row.append("%.3f (%d)" % (test_iou(path, opt, test_folder), opt.iteration))
        print("| " + " | ".join(row) + " |", flush=True)
    print("all %d checkpoints together: Spearman %s" % (len(pooled), " / ".join(
        "%.2f" % spearman(pooled, key) for key in COMPARED)))


def rescore(runs, test_folder):
    """Score again, with this code, every checkpoint a finished run still has (a rollback or
    restart overwrites some): the checkpoint the label-free score chooses among them and its
    test IoU. For a run that overwrote none, the choice the run would make today."""
    print("| run | checkpoints | Spearman with val IoU: %s | chosen: iteration, val IoU, test IoU |"
          % ", ".join(COMPARED))
    print("|" + " --- |" * 4)
    for run in runs:
        logged, _ = utils.read_stats(os.path.join(run, utils.STATS_FILE))
        val_iou = {r["iteration"]: r["val_iou"] for r in saved_records(logged)}  # the last one saved
        paths = sorted(train.checkpoint_files(run))
        opt = train.complete_options(utils.load_checkpoint(paths[0], "cpu")["options"])
        images, noise = train.label_free_inputs(datasets.make_dataset(opt.dataset, opt.dataroot, "val", opt.sizex,
                                                                      opt.maskroot), opt)
        records = []
        for path in paths:
            state = utils.load_checkpoint(path, "cpu")
            nets = utils.load_nets(state, ("netEncM", "netGenX", "netDX"), path=path)
            iteration = state["options"].iteration
            if iteration not in val_iou:  # a stop's checkpoint, not scored in the run
                continue
            records.append({"path": path, "iteration": iteration, "val_iou": val_iou[iteration],
                            "label_free": utils.label_free_scores(nets, images, noise, 32)._asdict()})
        chosen = max(records, key=lambda r: r["label_free"]["score"])
        print("| %s | %d | %s | %d, %.3f, %.3f |" % (
            run, len(records), " / ".join("%.2f" % spearman(records, key) for key in COMPARED), chosen["iteration"],
            chosen["val_iou"], test_iou(chosen["path"], opt, test_folder)), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    blobs = sub.add_parser("blobs", help="write the blobs dataset")
    blobs.add_argument("root")
    rep = sub.add_parser("report", help="how the score chose in finished runs")
    rep.add_argument("runs", nargs="+")
    rep.add_argument("--test-folder", help="score on the held-out images of this folder (IMAGES, MASKS inside)")
    again = sub.add_parser("rescore", help="score a finished run's checkpoints again with this code")
    again.add_argument("runs", nargs="+")
    again.add_argument("--test-folder", help="as for report")
    args = p.parse_args()
    if args.command == "blobs":
        make_blobs(os.path.join(args.root, "train"), seed=0)
        make_blobs(os.path.join(args.root, "test"), seed=1)
    elif args.command == "report":
        report(args.runs, args.test_folder)
    else:
        rescore(args.runs, args.test_folder)


if __name__ == "__main__":
    main()
