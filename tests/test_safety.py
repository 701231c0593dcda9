"""Crash safety, exact resume, and one clear line for every kind of bad input."""
import errno
import os
import random
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

import monitor
import runfolder
import utils
from conftest import (PROCESS_ENV, PROCESS_THREADS, ROOT, SMALL_RUN, assert_same_checkpoint, one_line_error,
                      run_process, run_script, trained)

SEEDED_RUN = ["--dataset", "flowers", "--checkpointFreq", 2, "--manualSeed", 4, "--clean"] + SMALL_RUN


def test_run_killed_at_random_moments_and_resumed_ends_bit_for_bit_as_uninterrupted(minidata_root, tmp_path):
    """Every run is a process with the same thread count (results round with it), so the
    comparison is bit for bit on any machine. Each process ends with 0 or the kill's
    signal, or the test fails with its output; every wait is bounded."""
    args = [str(a) for a in SEEDED_RUN + ["--dataroot", minidata_root / "flowers", "--nIteration", 9]]
    started = time.time()
    run_process("train.py", *args, "--outf", tmp_path / "whole", cwd=tmp_path)  # timed as the killed runs
    duration = time.time() - started

    outf = tmp_path / "killed"
    command = [sys.executable, os.path.join(ROOT, "train.py")] + args + ["--outf", str(outf)]
    rng = random.Random(os.environ.get("KILL_SEED", 0))
    kills, finished = [], False
    for attempt in range(6):
        if len(kills) == 3 or finished:
            break
        resume = ["--resume"] if list(outf.glob("state_*.pth")) else []
        log = tmp_path / ("attempt%d.log" % attempt)
        with open(log, "w") as output:
            process = subprocess.Popen(command + resume, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT,
                                       env=PROCESS_ENV)
            delay = rng.uniform(0.5, 0.9 * duration)
            try:
                returncode = process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                returncode = process.wait(timeout=60)
                kills.append(round(delay, 2))
        assert returncode in (0, -signal.SIGKILL), "attempt %d ended with %d:\n%s" % (attempt, returncode,
                                                                                      log.read_text())
        finished = returncode == 0
    if not finished:
        run_script("train.py", *args, "--outf", outf, "--resume", cwd=tmp_path, threads=PROCESS_THREADS)
    assert kills, "no kill landed while the run was going"
    whole = utils.load_checkpoint(tmp_path / "whole" / "state_00010.pth")
    resumed = utils.load_checkpoint(outf / "state_00010.pth")
    assert_same_checkpoint(whole, resumed)
    for name in ("train.dat", "val.dat"):
        assert (outf / name).read_text() == (tmp_path / "whole" / name).read_text(), kills
    whole_log, resumed_log = (monitor.read_stats(folder / "stats.jsonl") for folder in (tmp_path / "whole", outf))
    assert resumed_log[1] and [trained(r) for r in resumed_log[0]] == [trained(r) for r in whole_log[0]], kills


def test_resume_restores_streams_rng_and_sample_grid(minidata_root, tmp_path):
    """Stopping at a checkpoint and resuming is the same as never stopping, for every
    checkpoint (epochs of 3 batches: streams resume mid-epoch and at epoch ends)."""
    outf_whole, outf_parts = tmp_path / "whole", tmp_path / "parts"
    data = ["--dataroot", minidata_root / "flowers"]
    run_script("train.py", *SEEDED_RUN, *data, "--nIteration", 7, "--outf", outf_whole, cwd=tmp_path)
    run_script("train.py", *SEEDED_RUN, *data, "--nIteration", 3, "--outf", outf_parts, cwd=tmp_path)
    run_script("train.py", "--resume", "--nIteration", 5, "--outf", outf_parts, cwd=tmp_path)
    run_script("train.py", "--resume", "--nIteration", 7, "--outf", outf_parts, cwd=tmp_path)
    assert_same_checkpoint(utils.load_checkpoint(outf_whole / "state_00008.pth"),
                           utils.load_checkpoint(outf_parts / "state_00008.pth"))
    assert (outf_parts / "val.dat").read_text() == (outf_whole / "val.dat").read_text()
    for name in ("out_00008.png", "out_00006.png"):
        assert (outf_parts / name).read_bytes() == (outf_whole / name).read_bytes()


def test_resume_names_the_flags_it_ignores_and_drops_lines_written_after_its_checkpoint(minidata_root, tmp_path):
    """A run stopped after scoring iteration 6 but before its checkpoint was saved: the
    resumed run continues from iteration 4, and its .dat files end as an uninterrupted run's."""
    data = ["--dataroot", minidata_root / "flowers"]
    run_script("train.py", *SEEDED_RUN, *data, "--nIteration", 5, "--outf", tmp_path / "whole", cwd=tmp_path)
    outf = tmp_path / "parts"
    run_script("train.py", *SEEDED_RUN, *data, "--nIteration", 3, "--outf", outf, cwd=tmp_path)
    for name in ("train.dat", "val.dat"):
        with open(outf / name, "a") as f:
            f.write("6 0.5 0.25\n")  # scored, then stopped before state_00006.pth was written
    result = run_script("train.py", "--resume", "--nIteration", 5, "--outf", outf, "--silent", "--lrM", 0.5, "--nf", 8,
                        cwd=tmp_path)
    assert result.stderr.splitlines() == ["warning: --resume: continuing with the run's saved options; ignoring --lrM, --nf"]
    for name in ("train.dat", "val.dat"):
        assert (outf / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    assert utils.load_checkpoint(outf / "state_00006.pth")["options"].lrM == 1e-5


def test_resume_skips_an_incomplete_newest_checkpoint(minidata_root, tmp_path):
    outf = tmp_path / "out"
    run_script("train.py", *SEEDED_RUN, "--dataroot", minidata_root / "flowers", "--nIteration", 3, "--outf", outf,
               cwd=tmp_path)
    good = (outf / "state_00004.pth").read_bytes()
    (outf / "state_00006.pth").write_bytes(good[:len(good) // 2])  # as if the disk filled up
    result = run_script("train.py", "--resume", "--nIteration", 5, "--outf", outf, cwd=tmp_path)
    assert "skipping" in result.stderr and "state_00006.pth" in result.stderr
    assert utils.safe_torch_load(outf / "options.pth", "options.pth").iteration == 6


def test_kill_during_a_save_leaves_a_complete_file(tmp_path):
    """A process saving a large checkpoint over and over, killed at random moments: the
    file is always complete and loadable, and no temporary file is mistaken for it."""
    path = tmp_path / "state_00002.pth"
    writer = ("import sys, torch; sys.path.insert(0, %r); import utils\n"
              "x = torch.arange(4_000_000, dtype=torch.float32)\n"
              "save = lambda: utils.atomic_save({'x': x, 'options': None}, %r)\n"
              "save(); print('saved once', flush=True)\n"
              "while True: save()\n" % (ROOT, str(path)))
    rng = random.Random(1)
    leftovers = set()
    for _ in range(3):
        process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([process.stdout], [], [], 120)  # however long importing torch takes
        assert ready, "the writer saved nothing in 120 s"
        assert process.stdout.readline() == "saved once\n"
        time.sleep(rng.uniform(0.0, 1.0))  # then killed in the middle of one of the next saves
        process.kill()
        process.wait(timeout=60)
        state = torch.load(path)
        assert torch.equal(state["x"], torch.arange(4_000_000, dtype=torch.float32))
        assert runfolder.checkpoint_files(str(tmp_path)) == [str(path)]  # what --resume would choose from
        leftovers |= set(os.listdir(tmp_path)) - {path.name}
    assert leftovers, "no kill landed inside a save: nothing was checked"


def test_failed_save_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "state_00002.pth"
    utils.atomic_save({"a": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        utils.atomic_save({"a": lambda: None}, path)  # cannot be pickled: fails mid-write
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["state_00002.pth"]


def test_full_disk_is_a_clear_error_and_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "state_00002.pth"
    utils.atomic_save({"a": torch.ones(3)}, path)
    before = path.read_bytes()

    def fill_the_disk(f):  # as torch.save reports it: a RuntimeError while handling the OSError
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    with pytest.raises(utils.UserError, match="state_00002.pth: cannot write it \\(No space left on device\\)"):
        utils.atomic_write(path, fill_the_disk)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["state_00002.pth"]


def test_non_finite_loss_stops_with_the_iteration_and_keeps_the_checkpoint(minidata_root, tmp_path):
    outf = tmp_path / "out"
    args = ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--outf", outf,
            "--checkpointFreq", 2] + SMALL_RUN
    run_script("train.py", *args, "--nIteration", 1, cwd=tmp_path)
    state = utils.load_checkpoint(outf / "state_00002.pth")
    state["netDX"]["dense.weight"].fill_(float("nan"))
    torch.save(state, outf / "state_00002.pth")
    before = (outf / "state_00002.pth").read_bytes()
    result = run_script("train.py", *args, "--iteration", 2, "--nIteration", 5, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "error: iteration 2: lossG is nan; training diverged" in result.stderr
    assert (outf / "state_00002.pth").read_bytes() == before
    assert not (outf / "state_00004.pth").exists()


def test_resume_keeps_the_runs_clean_unless_told_otherwise(minidata_root, tmp_path):
    """--clean is the run's: a resume without it still keeps only the newest checkpoint;
    --no-clean keeps every one from then on, and says so."""
    outf = tmp_path / "out"
    run_script("train.py", *SEEDED_RUN, "--dataroot", minidata_root / "flowers", "--nIteration", 3, "--outf", outf,
               cwd=tmp_path)
    run_script("train.py", "--resume", "--nIteration", 5, "--outf", outf, "--silent", cwd=tmp_path)
    assert sorted(p.name for p in outf.glob("state_*.pth")) == ["state_00006.pth"]
    result = run_script("train.py", "--resume", "--nIteration", 9, "--outf", outf, "--silent", "--no-clean",
                        cwd=tmp_path)
    assert result.stderr.splitlines() == ["warning: --resume: --no-clean: from now on every checkpoint is kept (the "
                                          "run had --clean)"]
    assert sorted(p.name for p in outf.glob("state_*.pth")) == ["state_00006.pth", "state_00008.pth",
                                                                 "state_00010.pth"]


SIGNALLED_RUN = """
import os, signal, subprocess, sys
sys.path.insert(0, %r)
import scores, train, utils
signum, target, where = signal.Signals[sys.argv[1]], sys.argv[2], sys.argv[3]
sent = []

def send_once(now):  # to the group, from another process, as a scheduler or a terminal sends it
    if now and not sent:
        sent.append(signum)
        if target == "group":
            subprocess.run(["kill", "-s", signum.name[3:], "--", "-%%d" %% os.getpgrp()])
        else:
            os.kill(os.getpid(), signum)

iterate, segmentation_scores, atomic_save = train.training_iteration, scores.segmentation_scores, utils.atomic_save
if where == "iteration":
    def training_iteration(nets, optimizers, xData, xReal, zData, opt, iteration, *rest):
        send_once(iteration == 5)
        return iterate(nets, optimizers, xData, xReal, zData, opt, iteration, *rest)
    train.training_iteration = training_iteration
elif where == "scoring":  # scored a batch at a time, while the scoring loaders' workers run
    scores.segmentation_scores = lambda *args: send_once(True) or segmentation_scores(*args)
else:
    utils.atomic_save = lambda obj, path: send_once("state_" in str(path)) or atomic_save(obj, path)
train.main(sys.argv[4:])
"""
STOPPED_AT = {"iteration": 6, "scoring": 4, "saving": 4}  # checkpoints every 4 iterations
HALF_PERIOD = {"iteration": 2, "scoring": 0, "saving": 0}  # iterations since the last checkpoint


@pytest.fixture(scope="module")
def whole_runs(minidata_root, tmp_path_factory):
    """{workers: the output folder of a run never stopped}, made when first asked for."""
    runs = {}

    def whole(workers):
        if workers not in runs:
            runs[workers] = tmp_path_factory.mktemp("whole%d" % workers)
            run_script("train.py", *signalled_run_flags(minidata_root, workers), "--outf", runs[workers],
                       cwd=runs[workers], threads=PROCESS_THREADS)
        return runs[workers]
    return whole


def signalled_run_flags(minidata_root, workers):
    return ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--checkpointFreq", 4, "--manualSeed", 4,
            "--nIteration", 7, "--nf", 4, "--batchSize", 2, "--nTest", 2, "--workers", workers, "--device", "cpu",
            "--silent"]


@pytest.mark.parametrize("signum, target, workers, where", [  # each signal, target, worker count and moment once
    ("SIGTERM", "group", 1, "scoring"), ("SIGINT", "group", 1, "saving"), ("SIGINT", "process", 0, "iteration")])
def test_a_signal_to_the_process_or_its_group_stops_cleanly_whatever_the_workers(signum, target, workers, where,
                                                                                minidata_root, tmp_path,
                                                                                whole_runs):
    """SIGTERM or SIGINT to train.py alone or to its whole process group (loader workers
    included, as a scheduler or a terminal sends it), raised where the test says: inside
    iteration 5 (stops at 6 with a checkpoint of its own, holding the two iterations of its
    half-period), while scoring or while saving the checkpoint at 4 (stops at 4 with that one
    alone). No traceback, one line, exit 0; no process of the group outlives the run;
    --resume then ends as a run never stopped: weights, .dat files, every record's losses."""
    script = tmp_path / "signalled_run.py"
    script.write_text(SIGNALLED_RUN % ROOT)
    outf = tmp_path / "out"
    flags = [str(f) for f in signalled_run_flags(minidata_root, workers)]
    with open(tmp_path / "run.log", "w") as log:
        process = subprocess.Popen([sys.executable, str(script), signum, target, where, *flags, "--outf", str(outf)],
                                   cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=PROCESS_ENV,
                                   start_new_session=True)
        returncode = process.wait(timeout=120)
    text = (tmp_path / "run.log").read_text()
    assert returncode == 0 and "Traceback" not in text, text
    iteration = STOPPED_AT[where]
    assert text.strip().splitlines()[-1] == (
        "stopped by %s at iteration %d: %s holds it; continue with: python train.py --resume --outf %s"
        % (signum, iteration, outf / ("state_%05d.pth" % iteration), outf))
    assert sorted(p.name for p in outf.glob("state_*.pth")) == sorted({"state_00004.pth",
                                                                      "state_%05d.pth" % iteration})
    assert utils.load_checkpoint(outf / ("state_%05d.pth" % iteration))["resume"]["period"]["iterations"] == \
        HALF_PERIOD[where]
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the group is empty: no loader worker left behind
        os.killpg(process.pid, 0)
    run_script("train.py", "--resume", "--outf", outf, cwd=tmp_path, threads=PROCESS_THREADS)
    whole = whole_runs(workers)
    assert_same_checkpoint(utils.load_checkpoint(whole / "state_00008.pth"),
                           utils.load_checkpoint(outf / "state_00008.pth"))
    for name in ("train.dat", "val.dat"):
        assert (outf / name).read_text() == (whole / name).read_text()
    whole_log, resumed_log = (monitor.read_stats(folder / "stats.jsonl")[0] for folder in (whole, outf))
    assert [trained(r) for r in resumed_log] == [trained(r) for r in whole_log]


def test_a_second_run_into_a_used_folder_stops_before_touching_it_and_overwrite_starts_clean(minidata_root,
                                                                                             tmp_path):
    outf = tmp_path / "out"
    flags = ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--checkpointFreq", 2, "--manualSeed", 4,
             "--outf", outf] + SMALL_RUN
    run_script("train.py", *flags, "--nIteration", 3, cwd=tmp_path)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in outf.iterdir()}
    again = run_script("train.py", *flags, "--nIteration", 1, cwd=tmp_path, check=False)
    assert one_line_error(again) == (
        "error: --outf %s holds another run (best.pth, best_unsupervised.pth, curves.png, options.pth, ...): continue "
        "it with --resume, start over with --overwrite (removes that run's files), or choose another --outf" % outf)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in outf.iterdir()} == before
    run_script("train.py", *flags, "--nIteration", 1, "--overwrite", cwd=tmp_path)
    assert sorted(p.name for p in outf.glob("state_*.pth")) == ["state_00002.pth"]  # the old 4 is gone
    assert [row[0] for row in utils.read_dat(outf / "val.dat")] == [2]
    assert "--overwrite starts a new run" in one_line_error(
        run_script("train.py", *flags, "--overwrite", "--resume", cwd=tmp_path, check=False))


def test_resume_auto_starts_an_empty_folder_continues_its_run_and_refuses_another(minidata_root, tmp_path):
    """The same command, requeued: it starts the run (also over what a start stopped before
    its first checkpoint left), then continues it from its newest checkpoint; in a folder of
    a run with other options it stops with one line."""
    outf = tmp_path / "out"
    outf.mkdir()
    for name in ("train.dat", "val.dat"):
        (outf / name).write_text("2 0.5 0.25\n")  # scored, then stopped before its checkpoint
    flags = ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--checkpointFreq", 2, "--manualSeed", 4,
             "--outf", outf, "--resume", "auto"] + SMALL_RUN
    run_script("train.py", *flags, "--nIteration", 1, cwd=tmp_path)
    assert [row[0] for row in utils.read_dat(outf / "val.dat")] == [2]
    run_script("train.py", *flags, "--nIteration", 3, cwd=tmp_path)  # requeued, run further
    assert [row[0] for row in utils.read_dat(outf / "val.dat")] == [2, 4]
    assert [r["events"] for r in monitor.read_stats(outf / "stats.jsonl")[0]] == [[], ["resume"]]
    other = run_script("train.py", *flags, "--lrM", 2e-4, cwd=tmp_path, check=False)
    assert one_line_error(other) == (
        "error: --resume auto: %s belongs to a run of another configuration: lrM=0.0002 (the run: 1e-05); continue it "
        "with --resume (its own options), or use another --outf" % (outf / "state_00004.pth"))


def test_a_process_that_keeps_its_batch_stream_to_the_end_still_exits(minidata_root, tmp_path):
    """Loader workers end on their own parent's SIGTERM, which multiprocessing sends at exit to
    the workers of a stream still open (a torchrun rank script keeps its run to the end)."""
    script = ("import sys; sys.path.insert(0, %r); import datasets\n"
              "stream = datasets.BatchStream(datasets.make_dataset('flowers', %r, 'train'), 2, 1)\n"
              "next(stream); print('one batch', flush=True)\n" % (ROOT, str(minidata_root / "flowers")))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "one batch\n"), result.stderr
