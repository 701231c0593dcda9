"""Check a CUDA machine in under 8 minutes:

    python tools/gpu_check.py --out gpu_report

1. the device-sensitive tests on cuda (REDO_TEST_DEVICE=cuda: the same tests as on the CPU),
   the compiled iterations with inductor (REDO_SLOW_TESTS=1) among them;
2. tools/benchmark.py at the small and the paper configurations, fp32, --amp bf16 and
   --compile (inductor): seconds per iteration, images/s, peak GPU memory;
3. the built-in dataset trained at the paper's configuration for 3 minutes: validation IoU
   against minutes (tools/learning_curve.py), which must reach a checkpoint.
Everything goes to --out: report.md and one log per step. Without CUDA it says so in one
line and exits with status 1 at once. Exit status 1 too if a step failed (a test, any
benchmark measurement, a training without a checkpoint) or ran out of time.
"""
import argparse
import os
import signal
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_QUICKSTART = ["--dataset", "synthetic", "--nf", "64", "--nfX", "32", "--useSelfAttG", "--useSelfAttD",
                    "--batchSize", "20", "--autoRestart", ".05", "--checkpointFreq", "100", "--clean", "--cacheData",
                    "--workers", "4", "--nIteration", "100000", "--manualSeed", "1", "--device", "cuda", "--silent"]
STEPS = [  # name, command, seconds allowed
    ("tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_devices.py",
               "tests/test_faithful.py", "tests/test_speed_options.py",
               "-k", "device or two_training or eval_outputs or attention or compiled_iterations or most_likely"], 160),
    ("benchmark", [sys.executable, "tools/benchmark.py", "--configs", "small,paper", "--modes", "fp32,bf16,compile",
                   "--iterations", "3", "--skip-data", "--device", "cuda"], 170),
    ("training", [sys.executable, "tools/learning_curve.py", "--minutes", "3", "--"] + PAPER_QUICKSTART, 200),
]


GRACE_SECONDS = 20  # between SIGTERM and SIGKILL to a step that ran out of time


def run_step(name, command, seconds, out):
    """Run one step in a process group of its own, its output to OUT/NAME.log; (status,
    seconds taken, last lines). A step out of time gets SIGTERM (each tool ends the processes
    it started), then SIGKILL: every process of its group, so that nothing keeps the GPU."""
    env = dict(os.environ, REDO_TEST_DEVICE="cuda", REDO_SLOW_TESTS="1", PYTHONUNBUFFERED="1")
    log = os.path.join(out, name + ".log")
    start = time.time()
    with open(log, "w") as f:
        f.write("$ %s\n" % " ".join(command))
        f.flush()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=seconds)
            status = "passed" if code == 0 else "failed (exit status %d)" % code
        except subprocess.TimeoutExpired:
            status = "ran out of its %d s" % seconds
            end_group(process)
    with open(log) as f:
        tail = f.read().splitlines()[-25:]
    return status, time.time() - start, tail


def end_group(process):
    """SIGTERM to the process's group, SIGKILL to what is left of it after GRACE_SECONDS."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone
        pass
    process.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_report", help="folder for report.md and the logs")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: CUDA is not available on this machine (torch %s): nothing to check" % torch.__version__)
    os.makedirs(args.out, exist_ok=True)
    lines = ["# GPU check", "", "%s, torch %s, CUDA %s" % (torch.cuda.get_device_name(0), torch.__version__,
                                                          torch.version.cuda), ""]
    failed = False
    for name, command, seconds in STEPS:
        status, took, tail = run_step(name, command, seconds, os.path.abspath(args.out))
        print("%s: %s in %.0f s" % (name, status, took), flush=True)
        failed |= status != "passed"
        lines += ["## %s: %s in %.0f s" % (name, status, took), "", "```"] + tail + ["```", ""]
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print("report: %s" % os.path.join(args.out, "report.md"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
