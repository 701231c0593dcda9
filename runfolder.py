"""The run folder (--outf): the one table of the files a run writes there, and what finds,
writes, chooses and removes them (checkpoints, the score logs, what --clean removes, what a
rollback goes back to), the run's Progress saved in every checkpoint, and its closing summary."""
import glob
import os
import shutil
from dataclasses import dataclass, fields

import datasets
import utils
from utils import UserError

STATE = "state_%05d.pth"  # a checkpoint, by iteration
OPTIONS = "options.pth"  # the options of the newest checkpoint
BEST = "best.pth"  # the checkpoint of the best validation IoU
BEST_LABEL_FREE = "best_unsupervised.pth"  # the checkpoint the label-free score chooses
DAT_FILES = ("train.dat", "val.dat")  # "iteration accuracy IoU" at each checkpoint, as the original
STATS = "stats.jsonl"  # a record at each checkpoint (monitor.py)
CURVES = "curves.png"
SAMPLE_GRID = "out_%05d.png"  # by iteration
TENSORBOARD = "tensorboard"  # a folder, with --tensorboard

RUN_FILES = ("state_[0-9]*.pth", OPTIONS, BEST, BEST_LABEL_FREE) + DAT_FILES + (
    STATS, CURVES, "out_[0-9]*.png", TENSORBOARD)
"""What a run writes in --outf (README, What a run writes); the first four are checkpoints."""
LOGS = DAT_FILES + (STATS,)  # the logs a checkpoint records the length of, to continue them from it
NETWORK_OPTIONS = ("nx", "nz", "nMasks", "nResM", "nfD", "nfX", "nfM", "nfZ", "useSelfAttD", "useSelfAttG")


def state_path(outf, iteration):
    return os.path.join(outf, STATE % iteration)


def sample_grid_path(outf, iteration):
    return os.path.join(outf, SAMPLE_GRID % iteration)


def run_files(outf, patterns=RUN_FILES):
    return sorted({os.path.basename(path) for pattern in patterns
                   for path in glob.glob(os.path.join(glob.escape(outf), pattern))})


def check_output_folder(outf):
    try:
        os.makedirs(outf, exist_ok=True)
        utils.atomic_write(os.path.join(outf, ".write_test"), lambda f: f.write(b"ok"))
        os.remove(os.path.join(outf, ".write_test"))
    except OSError as e:
        raise UserError("--outf %s: cannot write there (%s)" % (outf, e.strerror or e)) from None


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


def remove_logs(outf, names=LOGS + (CURVES,)):
    """A new start's: the logs and curves of the run it replaces go."""
    for name in names:
        utils.remove_if_present(os.path.join(outf, name))


# ----------------------------------------------------------------------------- checkpoints

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


def check_same_networks(saved, opt, path):
    """A checkpoint loads only into nets of its own configuration: name what differs."""
    keys = NETWORK_OPTIONS + (("wrecZ",) if (saved.wrecZ > 0) != (opt.wrecZ > 0) else ())
    utils.check_same_options(saved, opt, keys, "this run", "%s: saved for another configuration: " % path)


def write_checkpoint(state, outf, iteration, best=False, best_label_free=False):
    """state_%05d.pth and options.pth; best.pth and best_unsupervised.pth when they are the
    best so far. Each file is whole or absent (utils.atomic_save)."""
    utils.atomic_save(state, state_path(outf, iteration))
    utils.atomic_save(state["options"], os.path.join(outf, OPTIONS))
    if best:
        utils.atomic_save(state, os.path.join(outf, BEST))
    if best_label_free:
        utils.atomic_save(state, os.path.join(outf, BEST_LABEL_FREE))


def stale_checkpoints(opt, iteration):
    """What --clean removes once the checkpoint of `iteration` is written: as the original, the
    state files of the period before it; with --rollback N, all but the N newest before it,
    which a rollback may go back to."""
    if opt.rollback:
        return newest_first(set(checkpoint_files(opt.outf)) - {state_path(opt.outf, iteration)})[opt.rollback:]
    return [state_path(opt.outf, i) for i in range(max(iteration - opt.checkpointFreq, 1), iteration)
            if os.path.exists(state_path(opt.outf, i))]


def rollback_target(outf, rollbacks_in_a_row):
    """The checkpoint a rollback goes back to: the newest, or for each rollback in a row
    (before the run gets past the iteration it collapsed at) one further back, as far as
    the checkpoints go: a collapse is often under way by the last checkpoint before it."""
    files = newest_first(checkpoint_files(outf))
    return files[min(rollbacks_in_a_row, len(files) - 1)]


# ----------------------------------------------------------------------------- the score logs

def append_scores(outf, iteration, split_scores):
    """A line "iteration accuracy IoU" in train.dat and val.dat, as the original."""
    for split, (acc, iou, _, _) in split_scores.items():
        utils.append_line(os.path.join(outf, split + ".dat"), "%d %s %s" % (iteration, acc, iou))


def drop_last_scores(outf):
    """Take back the lines append_scores() just wrote."""
    for name in DAT_FILES:
        path = os.path.join(outf, name)
        utils.truncate_lines(path, utils.count_lines(path) - 1)


def log_lengths(outf):
    """How many lines each log has: saved in a checkpoint, so that a run continued from it
    drops what was written after it (truncate_score_logs, monitor.continue_stats)."""
    return {name: utils.count_lines(os.path.join(outf, name)) for name in LOGS}


def truncate_score_logs(outf, lengths):
    for name in DAT_FILES:
        utils.truncate_lines(os.path.join(outf, name), lengths[name])


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

    def note_checkpoint(self, val_iou=None, label_free=None):
        """What a checkpoint the run keeps changes: the best scores so far, and the rollbacks in
        a row, ended by a healthy checkpoint at or past the collapse. Returns whether it is the
        best by validation IoU, and by the label-free score (neither for a checkpoint between
        two periods, when the run is stopped)."""
        best = val_iou is not None and self.bestValIoU < val_iou
        best_label_free = label_free is not None and self.bestLabelFree < label_free
        if best:
            self.bestValIoU = val_iou
        if best_label_free:
            self.bestLabelFree = label_free
        if self.iteration >= self.collapsedAt:
            self.rollbacksInARow = 0
        return best, best_label_free


def summary(opt, progress, records):
    """One line for the end of the run: the best checkpoint, the last one, what to run next.
    records: the run's stats.jsonl records."""
    last = next(iter(newest_first(checkpoint_files(opt.outf))), "none")
    val = utils.read_dat(os.path.join(opt.outf, "val.dat"))
    best = [iteration for iteration, _, iou in val if iou == progress.bestValIoU]
    label_free = [r["iteration"] for r in records if r["label_free"]["score"] == progress.bestLabelFree]
    unsupervised = os.path.join(opt.outf, BEST_LABEL_FREE)
    chosen = os.path.join(opt.outf, BEST) if best else unsupervised if label_free else last
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
