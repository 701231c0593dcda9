"""How well the label-free score chooses checkpoints (README, "Choosing a checkpoint without
labels").

    # a dataset made unlike --dataset synthetic, to check the score on data it was not designed on
    python tools/blobs.py DIR
    python train.py --dataset folder --dataroot DIR/train/images --maskroot DIR/train/masks ... --outf RUN
    # per run: Spearman correlation of the score (and of the other parts logged) with validation
    # IoU over its checkpoints, minutes to a validation IoU of 0.8, collapses, and the test IoU
    # of best_unsupervised.pth, best.pth and the last checkpoint: a Markdown table
    python tools/label_free_check.py report RUN [RUN ...] [--test-folder DIR/test]
    # the checkpoints a finished run kept, scored again with this code: what it chooses
    python tools/label_free_check.py rescore RUN [RUN ...] [--test-folder DIR/test]

--test-folder DIR/test scores on that folder's test split (tools/blobs.py).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import datasets  # noqa: E402
import monitor  # noqa: E402
import scores  # noqa: E402
import options  # noqa: E402
import runfolder  # noqa: E402
import utils  # noqa: E402


UNSAVED_EVENTS = tuple(monitor.EVENT_LINES)  # a period that ends in one keeps no checkpoint


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
        records, _ = monitor.read_stats(os.path.join(run, monitor.STATS_FILE))
        saved = saved_records(records)
        pooled += saved
        events = [event for r in records for event in r["events"]]
        row = [run, str(len(saved)), " / ".join("%.2f" % spearman(saved, key) for key in COMPARED),
               first_reaching(records, 0.8),
               ", ".join(str(events.count(event)) for event in UNSAVED_EVENTS)]
        last = runfolder.newest_first(runfolder.checkpoint_files(run))[0]
        for path in (os.path.join(run, runfolder.BEST_LABEL_FREE), os.path.join(run, "best.pth"), last):
            opt = options.complete_options(utils.load_checkpoint(path, "cpu")["options"])
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
        logged, _ = monitor.read_stats(os.path.join(run, monitor.STATS_FILE))
        val_iou = {r["iteration"]: r["val_iou"] for r in saved_records(logged)}  # the last one saved
        paths = sorted(runfolder.checkpoint_files(run))
        opt = options.complete_options(utils.load_checkpoint(paths[0], "cpu")["options"])
        valset = datasets.make_dataset(opt.dataset, opt.dataroot, "val", opt.sizex, opt.maskroot)
        images, noise = scores.label_free_inputs(valset, opt.nMasks, opt.nz)
        records = []
        for path in paths:
            state = utils.load_checkpoint(path, "cpu")
            nets = utils.load_nets(state, ("netEncM", "netGenX", "netDX"), path=path)
            iteration = state["options"].iteration
            if iteration not in val_iou:  # a stop's checkpoint, not scored in the run
                continue
            records.append({"path": path, "iteration": iteration, "val_iou": val_iou[iteration],
                            "label_free": scores.label_free_scores(nets, images, noise)._asdict()})
        chosen = max(records, key=lambda r: r["label_free"]["score"])
        print("| %s | %d | %s | %d, %.3f, %.3f |" % (
            run, len(records), " / ".join("%.2f" % spearman(records, key) for key in COMPARED), chosen["iteration"],
            chosen["val_iou"], test_iou(chosen["path"], opt, test_folder)), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="how the score chose in finished runs")
    rep.add_argument("runs", nargs="+")
    rep.add_argument("--test-folder", help="score on the held-out images of this folder (IMAGES, MASKS inside)")
    again = sub.add_parser("rescore", help="score a finished run's checkpoints again with this code")
    again.add_argument("runs", nargs="+")
    again.add_argument("--test-folder", help="as for report")
    args = p.parse_args()
    if args.command == "report":
        report(args.runs, args.test_folder)
    else:
        rescore(args.runs, args.test_folder)


if __name__ == "__main__":
    main()
