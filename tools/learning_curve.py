"""Validation IoU against wall-clock time: runs train.py and prints
one line per checkpoint, `minutes iteration val_accuracy val_IoU`, until --minutes have
passed. Flags after `--` go to train.py (default: the README's synthetic quickstart).

    python tools/learning_curve.py --minutes 30
    python tools/learning_curve.py --minutes 10 -- --dataset synthetic --nf 16 --batchSize 4
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

from benchmark import QUICKSTART  # this folder is on the path of a script run from it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--outf", default=None, help="output folder (default: a temporary one)")
    p.add_argument("train_flags", nargs="*", help="flags for train.py, after --")
    args = p.parse_args()
    flags = args.train_flags or QUICKSTART + ["--nIteration", "100000", "--manualSeed", "1", "--silent"]
    outf = args.outf or tempfile.mkdtemp(prefix="redo_curve_")
    command = [sys.executable, os.path.join(ROOT, "train.py")] + flags + ["--outf", outf]
    print("# %s" % " ".join(command[1:]), flush=True)
    print("# minutes iteration val_accuracy val_IoU", flush=True)
    start = time.time()
    process = subprocess.Popen(command, start_new_session=True)  # its own group, loader workers included
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit("learning_curve: stopped by SIGTERM"))  # (finally)
    seen, best = 0, float("nan")
    val = os.path.join(outf, "val.dat")
    try:
        while time.time() - start < args.minutes * 60 and process.poll() is None:
            time.sleep(2)
            if os.path.exists(val):
                with open(val) as f:
                    lines = f.read().splitlines()
                for line in lines[seen:]:
                    iteration, acc, iou = line.split()
                    best = float(iou) if best != best else max(best, float(iou))
                    print("%.1f %s %.4f %.4f" % ((time.time() - start) / 60, iteration, float(acc), float(iou)),
                          flush=True)
                seen = len(lines)
    finally:
        exit_status = process.poll()  # None: still running
        if exit_status is None:  # (once ended and waited for, its group is gone)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    print("# best validation IoU %.4f within %.1f minutes" % (best, (time.time() - start) / 60))
    if exit_status not in (None, 0):
        sys.exit("train.py failed (exit status %d): its output is above" % process.returncode)
    if not seen:
        sys.exit("train.py reached no checkpoint in %g minutes" % args.minutes)


if __name__ == "__main__":
    main()
