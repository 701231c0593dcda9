"""train.py end to end on miniature datasets in each dataset's exact on-disk format."""
import argparse
import contextlib
import copy
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import models
import options
import runfolder
import scores
import train
import utils
from conftest import (SMALL_RUN, assert_same_tensors, assert_weights_retrace, fixture_path, force_collapse, grid_size,
                      original_run_flowers, read_dat, run_process, run_script)

OUR_FILES = ["best_unsupervised.pth", "curves.png", "stats.jsonl"]  # what we write beside the original's files
STATE_KEYS = {"netEncM", "netGenX", "netDX", "netRecZ", "optimizerEncM", "optimizerGenX", "optimizerDX",
              "optimizerRecZ", "options"}


@pytest.mark.parametrize("dataset", ["flowers", "cub", "lfw"])
def test_training_writes_the_original_files(dataset, minidata_root, tmp_path):
    outf = tmp_path / "out"
    run = run_process if dataset == "flowers" else run_script  # once as a user runs it: a new process
    result = run("train.py", "--dataset", dataset, "--dataroot", minidata_root / dataset, "--outf", outf,
                 "--nIteration", 3, "--checkpointFreq", 2, "--manualSeed", 3, "--clean", *SMALL_RUN, cwd=tmp_path)
    assert result.stdout == ""  # --silent
    assert sorted(os.listdir(outf)) == sorted(["best.pth", "options.pth", "out_00002.png", "out_00004.png",
                                               "state_00004.pth", "train.dat", "val.dat", *OUR_FILES])
    for name in ("out_00002.png", "out_00004.png"):
        with Image.open(outf / name) as img:
            assert img.size == grid_size(nTest=2, nMasks=2) and img.mode == "RGB"
            pixels = np.asarray(img)
        assert pixels.std() > 10  # images were drawn, not a blank grid
    train_dat, val_dat = read_dat(outf / "train.dat"), read_dat(outf / "val.dat")
    assert [row[0] for row in train_dat] == [2, 4] and [row[0] for row in val_dat] == [2, 4]
    for _, acc, iou in val_dat:
        assert 0 <= iou <= acc <= 1
    if dataset == "lfw":  # LFW's train split has no masks
        assert all(np.isnan(row[1:]).all() for row in train_dat)
    else:
        assert all(0 <= iou <= acc <= 1 for _, acc, iou in train_dat)
    state = utils.load_checkpoint(outf / "state_00004.pth")
    assert set(state) >= STATE_KEYS
    opt = utils.safe_torch_load(outf / "options.pth", "options.pth")
    assert isinstance(opt, argparse.Namespace) and opt.iteration == 4 and opt.device == "cpu"
    assert opt.dataset == dataset and opt.nfX == 4 and opt.manualSeed == 3
    assert opt.bestValIoU == max(row[2] for row in val_dat)
    best = utils.load_checkpoint(outf / "best.pth")
    assert best["options"].bestValIoU == opt.bestValIoU
    nets = utils.load_nets(state, ["netEncM", "netGenX", "netDX", "netRecZ"])
    assert nets.netEncM(torch.zeros(1, 3, 128, 128)).shape == (1, 2, 128, 128)


def test_cmnist_toy_dataset(minidata_root, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.CMNISTDataset, "__len__", lambda self: 16)  # 1000 per split: slow to score
    outf = tmp_path / "out"
    run_script("train.py", "--dataset", "cmnist", "--dataroot", minidata_root / "cmnist", "--outf", outf,
               "--nIteration", 1, "--checkpointFreq", 2, "--nMasks", 3, *SMALL_RUN, cwd=tmp_path)
    with Image.open(outf / "out_00002.png") as img:
        assert img.size == grid_size(nTest=2, nMasks=3)
    (_, acc, iou), = read_dat(outf / "val.dat")
    assert 0 <= iou <= acc <= 1


def test_seeded_run_retraces_the_original(tmp_path, threads):
    """Same flags and data as a recorded run of the original train.py: the same train.dat and
    val.dat, and the same weights within float rounding (see fixtures/README.md)."""
    with open(fixture_path("original_train_run.json")) as f:
        original = json.load(f)
    outf = tmp_path / "out"
    # any positive number of workers draws the original's random numbers (it always used 4)
    run_script("train.py", *original["flags"], "--dataroot", original_run_flowers(tmp_path), "--outf", outf,
               "--workers", 1, "--device", "cpu", cwd=tmp_path)
    assert sorted(os.listdir(outf)) == sorted(original["files"] + OUR_FILES)  # the original's, and ours
    assert_dat_files_equal(outf, original)
    # Our convolutions sum in another order than the original's, and Adam with beta1 = 0
    # turns a gradient at rounding level into an lr-sized step, which six steps amplify.
    # Measured with 1 and 2 threads on an AMD EPYC (Zen 3, AVX2) and an Intel Xeon (AVX-512,
    # KVM): largest gap 4.0e-6 (netEncM), 3.3e-4 (netGenX), 3.5e-4 (netDX, Xeon), 1.2e-5
    # (netRecZ); at most 10% of a weight tensor's elements beyond 1e-5 (Xeon; biases: see
    # conftest.is_weight). Bounds: twice that.
    assert_weights_retrace(utils.load_checkpoint(outf / "state_00006.pth"),
                           torch.load(fixture_path("original_train_run_state_00006.pt")),
                           bounds={"netEncM": 1e-5, "netGenX": 7e-4, "netDX": 7.1e-4, "netRecZ": 3e-5},
                           fraction=0.5, free_bias_steps=range(1, 7))


def assert_dat_files_equal(outf, original):
    """Our train.dat and val.dat against the lines the original wrote: as many, equal to rounding."""
    for name in ("train.dat", "val.dat"):
        ours = read_dat(outf / name)
        theirs = [[float(v) for v in line.split()] for line in original[name]]
        assert len(ours) == len(theirs), name
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=name)


def test_checkpoint_of_the_original_continues_as_the_original_continues_it(tmp_path, threads):
    """A state_00002.pth written by the original's own train.py (old spectral-norm keys, its
    Adam states, options without our newer flags), given to train.py --iteration 2: the
    checkpoint and scores the original wrote when it continued the same file."""
    with open(fixture_path("original_resume_run.json")) as f:
        original = json.load(f)
    outf = tmp_path / "out"
    outf.mkdir()
    shutil.copy(fixture_path("original_state_00002.pth"), outf / "state_00002.pth")
    saved = utils.load_checkpoint(outf / "state_00002.pth")["options"]
    assert not hasattr(saved, "amp") and not hasattr(saved, "cacheData")  # the original's own options
    run_script("train.py", *original["flags"], *original["continued"], "--dataroot", original_run_flowers(tmp_path),
               "--outf", outf, "--workers", 1, "--device", "cpu", cwd=tmp_path)
    assert sorted(os.listdir(outf)) == sorted(original["files"] + OUR_FILES)  # the original's, and ours
    assert_dat_files_equal(outf, original)
    state = utils.load_checkpoint(outf / "state_00004.pth")
    assert {s["step"].item() for s in state["optimizerGenX"]["state"].values()} == {4}  # its Adam went on
    # Measured on two AMD EPYCs (AVX2) and an Intel Xeon (AVX-512, KVM; every gap smaller there),
    # 1 and 2 threads: largest gap 8.4e-6 (netEncM, 2 threads on a Zen 3), 1.2e-5 (netGenX),
    # 2.7e-7 (netDX, Xeon), 4.5e-7 (netRecZ); at most 0.08% of a tensor beyond 1e-5. Bounds:
    # twice that, or 1e-6.
    assert_weights_retrace(state, torch.load(fixture_path("original_resume_state_00004.pt")),
                           bounds={"netEncM": 1.7e-5, "netGenX": 3e-5, "netDX": 1e-6, "netRecZ": 1e-6},
                           fraction=0.002, free_bias_steps=range(3, 5))


@pytest.mark.parametrize("train_size, val_size, threshold, collapsed", [
    (0.02, 0.03, 0.1, True), (0.02, 0.30, 0.1, False), (0.30, 0.02, 0.1, False), (0.10, 0.02, 0.1, False),
    (0.0, 0.0, 0, False)])  # the last: --autoRestart 0, off
def test_collapse_needs_a_small_region_on_train_and_val(train_size, val_size, threshold, collapsed):
    assert scores.has_collapsed([train_size, val_size], threshold) == collapsed


def collapsed_checkpoint(minidata_root, outf, iterations):
    """A short run's checkpoint, collapsed (conftest.force_collapse), also saved as
    state_N.pth for each N of iterations."""
    common = ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--outf", outf,
              "--checkpointFreq", 2, "--manualSeed", 5] + SMALL_RUN
    run_script("train.py", *common, "--nIteration", 1, cwd=outf.parent)
    state = force_collapse(outf / "state_00002.pth")
    for iteration in iterations:
        torch.save(state, outf / ("state_%05d.pth" % iteration))
    common.remove("--silent")
    return common, state


def test_auto_restart_after_a_forced_collapse(minidata_root, tmp_path):
    outf = tmp_path / "out"
    common, state = collapsed_checkpoint(minidata_root, outf, [2])
    result = run_script("train.py", *common, "--iteration", 2, "--nIteration", 3, "--autoRestart", 0.1,
                        cwd=tmp_path)
    assert "Training appear to have collapsed.\nReinitializing training." in result.stdout
    # the first run's checkpoint at 2, the collapsed one at 4, then 2 and 4 again after the restart
    assert [row[0] for row in read_dat(outf / "val.dat")] == [2, 4, 2, 4]
    restarted = utils.load_checkpoint(outf / "state_00004.pth")
    assert restarted["netEncM"]["out.mods.9.bias"].abs().max() < 1
    assert not torch.equal(restarted["netEncM"]["out.mods.9.weight"], state["netEncM"]["out.mods.9.weight"])


@pytest.mark.parametrize("iteration, restarts", [(7000, True), (7002, False)])
def test_auto_restart_only_up_to_iteration_7000(iteration, restarts, minidata_root, tmp_path):
    """A collapse found at a checkpoint of iteration 7000 or less restarts; later, the run
    is only told and goes on, as in the original (train.train then saves the checkpoint)."""
    outf = tmp_path / "out"
    common, state = collapsed_checkpoint(minidata_root, outf, [])
    argv = [str(a) for a in common] + ["--autoRestart", "0.1", "--iteration", "2"]
    opt, _ = options.resolve_options(options.make_parser().parse_args(argv), options.explicit_flags(argv))
    run = train.TrainingRun(opt, (str(outf / "state_00002.pth"), state))
    run.progress.iteration = iteration
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert train.recovery_action(opt, run.progress, run.score(), run.label_free_score()) == (
            "restart" if restarts else None)
    assert "Training appear to have collapsed." in output.getvalue()
    assert ("Reinitializing training." in output.getvalue()) == restarts


def nets_state(nets):
    """A copy of every net's state dict."""
    return copy.deepcopy({name: net.state_dict() for name, net in nets.items()})


def fresh_nets_in_the_original_order(opt, rng, trained_netRecZ):
    """The state dicts of the nets a restart builds from the torch random state rng, as the
    original's collapse branch: new mask extractor, generators and discriminator created,
    then each initialised; then the trained noise reconstructor re-initialised in place."""
    netRecZ = models.build_net("netRecZ", opt)
    netRecZ.load_state_dict(trained_netRecZ)
    torch.set_rng_state(rng)
    expected = {name: models.build_net(name, opt) for name in ("netEncM", "netGenX", "netDX")}
    for net in expected.values():
        models.init_weights_orthogonal(net, opt.initOrthoGain)
    expected["netRecZ"] = models.init_weights_orthogonal(netRecZ, opt.initOrthoGain)
    return {name: net.state_dict() for name, net in expected.items()}


def test_restart_draws_fresh_nets_in_the_original_order_and_reinitialises_netRecZ(minidata_root, tmp_path):
    """The original's collapse branch: new mask extractor, generators and discriminator are
    created, then each is initialised; then the existing noise reconstructor's layers are
    re-initialised in place (all of its weights: see README, differences), drawing after them."""
    argv = ["--dataset", "flowers", "--dataroot", str(minidata_root / "flowers"), "--outf", str(tmp_path),
            "--manualSeed", "5"] + SMALL_RUN
    opt, _ = options.resolve_options(options.make_parser().parse_args(argv), options.explicit_flags(argv))
    run = train.TrainingRun(opt)
    for _ in range(2):
        run.train_one_iteration()
    trained = {key: value.clone() for key, value in run.nets.netRecZ.state_dict().items()}
    rng = torch.get_rng_state()
    run.restart()
    assert opt.iteration == 0
    expected = fresh_nets_in_the_original_order(opt, rng, trained)
    assert_same_tensors(nets_state(run.nets), expected)
    weights = [key for key in trained if key.endswith(("weight_orig", "dense.weight"))]
    assert len(weights) > 1 and all(not torch.equal(trained[key], expected["netRecZ"][key]) for key in weights)
    assert all(state["step"].item() == 0 for optimizer in run.optimizers.values()
               for state in optimizer.state.values())  # fresh optimizers


def test_run_ends_with_a_summary_of_what_to_use_next(minidata_root, tmp_path):
    outf = tmp_path / "out"
    args = ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--outf", outf, "--nIteration", 3,
            "--checkpointFreq", 2, "--manualSeed", 3] + [a for a in SMALL_RUN if a != "--silent"]
    result = run_script("train.py", *args, cwd=tmp_path)
    best = max(read_dat(outf / "val.dat"), key=lambda row: row[2])
    records = [json.loads(line) for line in open(outf / "stats.jsonl")]
    label_free = max(records, key=lambda r: r["label_free"]["score"])
    assert result.stdout.splitlines()[-1] == (
        "done: best validation IoU %.4f at iteration %d (%s); best label-free score %.3f at iteration %d (%s); "
        "last checkpoint %s; segment with: python example_load_pretrained.py --statePath %s --dataroot %s"
        % (best[2], best[0], outf / "best.pth", label_free["label_free"]["score"], label_free["iteration"],
           outf / "best_unsupervised.pth", outf / "state_00004.pth", outf / "best.pth", minidata_root / "flowers"))


def test_rollbacks_go_back_one_checkpoint_further_each_time_in_a_row_and_go_on(minidata_root, tmp_path,
                                                                              monkeypatch):
    """--rollback: a collapse found at iteration 6 (forced) sends the run back to its
    checkpoint at 4, from where it goes on with fresh noise and data; collapsing again at 6
    sends it back to 2; nothing before is lost, and --clean keeps the checkpoints a
    rollback may go back to."""
    calls = []

    def collapsed_at_the_third_and_fourth_checkpoints(sizes, threshold):
        calls.append(sizes)
        return len(calls) in (3, 4)

    monkeypatch.setattr(scores, "has_collapsed", collapsed_at_the_third_and_fourth_checkpoints)
    outf = tmp_path / "out"
    args = ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--outf", outf, "--nIteration", 9,
            "--checkpointFreq", 2, "--manualSeed", 3, "--autoRestart", 0.1, "--rollback", 2, "--clean",
            *[a for a in SMALL_RUN if a != "--silent"]]
    result = run_script("train.py", *args, cwd=tmp_path)
    for number, iteration in ((1, 4), (2, 2)):
        assert ("Training appear to have collapsed.\nRolling back to %s (rollback %d of 2), with fresh noise and "
                "data order." % (outf / ("state_%05d.pth" % iteration), number)) in result.stdout
    assert "Reinitializing" not in result.stdout
    assert [row[0] for row in read_dat(outf / "val.dat")] == [2, 4, 6, 6, 4, 6, 8, 10]
    records = [json.loads(line) for line in open(outf / "stats.jsonl")]
    assert [r["events"] for r in records] == [[], [], ["rollback"], ["rollback"], [], [], [], []]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12, 14, 16]  # iterations trained, rolled back too
    assert records[3]["losses"] != records[2]["losses"]  # the two periods from 4 to 6 drew differently
    assert sorted(p.name for p in outf.glob("state_*.pth")) == ["state_00006.pth", "state_00008.pth",
                                                                "state_00010.pth"]
    progress = runfolder.Progress.of_checkpoint(utils.load_checkpoint(outf / "state_00010.pth"))
    assert (progress.rollbacks, progress.rollbacksInARow, progress.collapsedAt) == (2, 0, 6)


@pytest.mark.parametrize("refound, restarted", [
    ([0.3, 0.4, 0.2, 0.1, 0.2], 2),  # a third start as low goes on: no restart left (at most 2 here)
    ([0.3, 0.6, 0.1, 0.2, 0.2], 1)])  # low at a later checkpoint: goes on
def test_early_restart_leaves_a_start_that_scores_low_at_its_first_checkpoint(refound, restarted, minidata_root,
                                                                               tmp_path, monkeypatch):
    """--earlyRestart 0.5: a start whose found-again score is under 0.5 at its first checkpoint
    restarts from scratch, nothing of it saved, while restarts are left; nothing else restarts."""
    real_scores, chosen = scores.label_free_scores, iter(refound)
    monkeypatch.setattr(scores, "label_free_scores", lambda *args: real_scores(*args)._replace(refound=next(chosen)))
    monkeypatch.setattr(options, "EARLY_RESTARTS", 2)
    outf = tmp_path / "out"
    result = run_script("train.py", "--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--outf", outf,
                        "--nIteration", 10 - 2 * restarted, "--checkpointFreq", 2, "--manualSeed", 3,
                        "--earlyRestart", 0.5, *[a for a in SMALL_RUN if a != "--silent"], cwd=tmp_path)
    assert result.stdout.count("under --earlyRestart 0.5 at the first checkpoint") == restarted
    for number in range(1, restarted + 1):
        assert ("Found-again score %.3f under --earlyRestart 0.5 at the first checkpoint: restarting from scratch "
                "(%d of 2)." % (refound[number - 1], number)) in result.stdout
    records = [json.loads(line) for line in open(outf / "stats.jsonl")]
    assert [(r["iteration"], r["step"], r["events"]) for r in records] == \
        [(2, 2 * k + 2, ["early_restart"]) for k in range(restarted)] + \
        [(2 * k + 2, 2 * (k + restarted) + 2, []) for k in range(5 - restarted)]
    assert sorted(p.name for p in outf.glob("state_*.pth")) == ["state_%05d.pth" % (2 * k + 2)
                                                                for k in range(5 - restarted)]
    assert runfolder.Progress.of_checkpoint(utils.load_checkpoint(max(outf.glob("state_*.pth")))).earlyRestarts == restarted


def test_rollback_needs_the_collapse_test(minidata_root, tmp_path):
    result = run_script("train.py", "--dataroot", minidata_root / "flowers", "--outf", tmp_path, "--rollback", 2,
                        *SMALL_RUN, cwd=tmp_path, check=False)
    assert result.returncode != 0 and "--rollback 2: expected 0, or a positive number with --autoRestart x" in \
        result.stderr


def next_iteration_inputs(run, monkeypatch):
    """The generator's batch, the discriminator's batch and the noise of run's next iteration."""
    seen, iterate = [], train.training_iteration
    with monkeypatch.context() as m:
        m.setattr(train, "training_iteration", lambda nets, optimizers, xData, xReal, zData, *args:
                  seen.append((xData, xReal, zData)) or iterate(nets, optimizers, xData, xReal, zData, *args))
        run.train_one_iteration()
    return seen[0]


def test_a_rollback_loads_its_checkpoint_and_goes_on_with_fresh_noise_and_data_order(minidata_root, tmp_path,
                                                                                   monkeypatch):
    """Right after a rollback, every net and optimizer is the target checkpoint's, bit for bit;
    the next iteration draws its batches from fresh streams and its noise after reseeding from
    --manualSeed and the rollback's number (so a second run with the seed draws them alike),
    not what resuming that checkpoint would replay."""
    argv = ["--dataset", "flowers", "--dataroot", str(minidata_root / "flowers"), "--outf", str(tmp_path),
            "--manualSeed", "5", "--checkpointFreq", "2", "--autoRestart", "0.1", "--rollback", "2"] + SMALL_RUN
    opt, _ = options.resolve_options(options.make_parser().parse_args(argv), options.explicit_flags(argv))
    run = train.TrainingRun(opt)
    for _ in range(2):
        run.train_one_iteration()
    run.save_checkpoint()
    for _ in range(2):  # on past it, to the middle of an epoch (3 batches of 2 images)
        run.train_one_iteration()
    path = runfolder.rollback_target(opt.outf, run.progress.rollbacksInARow)
    assert path == str(tmp_path / "state_00002.pth")
    target = utils.load_checkpoint(path)
    run.rollback()
    assert (run.progress.iteration, run.progress.rollbacks) == (2, 1)
    assert_same_tensors(nets_state(run.nets), {name: target[name] for name, _ in run.nets.items()})
    assert_same_tensors({name: optimizer.state_dict()["state"] for name, optimizer in run.optimizers.items()},
                        {name: target[name]["state"] for name in run.optimizers})
    drawn = next_iteration_inputs(run, monkeypatch)

    utils.seed_everything(utils.derived_seed(opt.manualSeed, 1))
    generator_stream, discriminator_stream = run.batch_stream(), run.batch_stream()
    fresh = (next(generator_stream)[0], next(discriminator_stream)[0], torch.randn_like(drawn[2]))
    replay = next_iteration_inputs(train.TrainingRun(opt, (path, target)), monkeypatch)
    for name, rolled_back, expected, replayed in zip(("xData", "xReal", "zData"), drawn, fresh, replay):
        assert torch.equal(rolled_back, expected), name
        assert not torch.equal(rolled_back, replayed), name


def test_collapses_beyond_the_rollbacks_allowed_restart_as_the_original(minidata_root, tmp_path, monkeypatch):
    """--rollback 1: the first collapse (forced, at the third checkpoint) rolls back, the
    second restarts from scratch (--autoRestart, before iteration 7000)."""
    calls = []
    monkeypatch.setattr(scores, "has_collapsed", lambda sizes, threshold: calls.append(sizes) or len(calls) in (3, 4))
    outf = tmp_path / "out"
    result = run_script("train.py", "--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--outf", outf,
                        "--nIteration", 5, "--checkpointFreq", 2, "--manualSeed", 3, "--autoRestart", 0.1,
                        "--rollback", 1, *[a for a in SMALL_RUN if a != "--silent"], cwd=tmp_path)
    assert result.stdout.count("Training appear to have collapsed.") == 2
    assert result.stdout.count("Rolling back") == 1 and "(rollback 1 of 1)" in result.stdout
    assert result.stdout.count("Reinitializing training.") == 1
    assert [row[0] for row in read_dat(outf / "val.dat")] == [2, 4, 6, 6, 2, 4, 6]


def test_an_early_restart_starts_from_fresh_nets_and_keeps_nothing_of_the_abandoned_start(minidata_root, tmp_path,
                                                                                         monkeypatch):
    """The first checkpoint's found-again score (forced) is under --earlyRestart: when rank 0's
    decision reaches the run, no checkpoint, best file or .dat line of that start is left, and
    the next start's first iteration begins from nets built afresh, in the original's order,
    from the random state the decision carries."""
    real_scores, chosen = scores.label_free_scores, iter([0.3, 0.9])
    monkeypatch.setattr(scores, "label_free_scores", lambda *args: real_scores(*args)._replace(refound=next(chosen)))
    outf = tmp_path / "out"
    decisions, restore = [], utils.restore_rng_states

    def restore_and_look(states, *args):
        decisions.append((states["torch"].clone(), sorted(os.listdir(outf)),
                          [(outf / name).read_text() for name in runfolder.DAT_FILES if (outf / name).exists()]))
        return restore(states, *args)

    monkeypatch.setattr(utils, "restore_rng_states", restore_and_look)
    before, after, iterate = [], [], train.TrainingRun.train_one_iteration

    def iteration(run):
        before.append((run.progress.iteration, nets_state(run.nets)))
        iterate(run)
        after.append(nets_state(run.nets))

    monkeypatch.setattr(train.TrainingRun, "train_one_iteration", iteration)
    flags = ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--outf", outf, "--checkpointFreq", 2,
             "--manualSeed", 3, "--earlyRestart", 0.5] + SMALL_RUN
    opt = options.options_for(*flags)
    run_script("train.py", *flags, "--nIteration", 1, cwd=tmp_path)
    assert [iteration for iteration, _ in before] == [0, 1, 0, 1]  # the abandoned start, then the next
    rng, files, dat_files = decisions[0]
    assert not [name for name in files if name.startswith(("state_", "best"))], files
    assert all(text == "" for text in dat_files), dat_files
    assert_same_tensors(before[2][1], fresh_nets_in_the_original_order(opt, rng, after[1]["netRecZ"]))
    assert [row[0] for row in read_dat(outf / "val.dat")] == [2]
