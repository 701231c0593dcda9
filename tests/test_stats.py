"""What a run records as it trains: stats.jsonl, curves.png, TensorBoard, the lines it prints."""
import json
import os
import sys

import pytest
import torch
from PIL import Image

import datasets
import monitor
import utils
from conftest import SMALL_RUN, one_line_error, read_dat, run_script, trained

RUN = ["--dataset", "flowers", "--checkpointFreq", 2, "--manualSeed", 4, "--autoRestart", 0.01] + SMALL_RUN
KEYS = {"iteration", "step", "seconds", "period_seconds", "score_seconds", "iterations_per_second",
        "images_per_second", "losses", "region_sizes", "train_acc", "train_iou", "val_acc", "val_iou", "label_free",
        "label_free_seconds", "events", "peak_memory_mb"}


def records(outf):
    with open(outf / "stats.jsonl") as f:
        return [json.loads(line) for line in f]


def labelled_lines(axes):
    """{label: (x, y)} of the lines of matplotlib axes that have a label."""
    return {line.get_label(): ([float(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()])
            for line in axes.get_lines() if not line.get_label().startswith("_")}


def test_one_record_per_checkpoint_and_a_curves_picture(minidata_root, tmp_path, monkeypatch):
    figures, draw = [], monitor.curves_figure
    monkeypatch.setattr(monitor, "curves_figure", lambda *args: figures.append(draw(*args)) or figures[-1])
    outf = tmp_path / "out"
    run_script("train.py", *RUN, "--dataroot", minidata_root / "flowers", "--nIteration", 3, "--outf", outf,
               cwd=tmp_path)
    first = (outf / "curves.png").read_bytes()
    run_script("train.py", "--resume", "--nIteration", 5, "--outf", outf, "--silent", cwd=tmp_path)
    log = records(outf)
    assert [r["iteration"] for r in log] == [row[0] for row in read_dat(outf / "val.dat")] == [2, 4, 6]
    assert [r["step"] for r in log] == [2, 4, 6]
    assert [r["events"] for r in log] == [[], [], ["resume"]]
    for r in log:
        assert set(r) == KEYS
        assert set(r["losses"]) == {"lossG", "lossD", "err_recZ"}
        assert all(set(v) == {"mean", "last"} for v in r["losses"].values())
        assert [len(r["region_sizes"][split]) for split in ("train", "val")] == [2, 2]
        assert sum(r["region_sizes"]["val"]) == pytest.approx(1, abs=1e-4)
        assert r["iterations_per_second"] > 0 and r["images_per_second"] == pytest.approx(  # both rounded:
            2 * r["iterations_per_second"], abs=6e-4)  # images/s to 3 decimals, iterations/s to 4 (x 2)
    assert [r["val_iou"] for r in log] == [row[2] for row in read_dat(outf / "val.dat")]
    assert log[0]["seconds"] < log[1]["seconds"] < log[2]["seconds"]
    with Image.open(outf / "curves.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > 500
    assert (outf / "curves.png").read_bytes() != first  # redrawn with the new record
    lines = {}
    for axes in figures[-1].axes:  # losses, region sizes, scores, and the label-free score's own axis
        lines.update(labelled_lines(axes))
    steps = [float(r["step"]) for r in log]
    expected = {name: [r["losses"][name]["mean"] for r in log] for name in ("lossG", "lossD", "err_recZ")}
    expected.update({"region %d, %s" % (k, split): [r["region_sizes"][split][k] for r in log]
                     for split in ("train", "val") for k in range(2)})
    expected.update({key: [r[key] for r in log] for key in ("val_iou", "val_acc", "train_iou")})
    expected["label-free score"] = [r["label_free"]["score"] for r in log]
    assert lines == {**{name: (steps, values) for name, values in expected.items()},
                     "--autoRestart": ([0.0, 1.0], [0.01, 0.01])}
    for r in log:  # each region's size: the mean of its soft masks over the split
        netEncM = utils.load_nets(utils.load_checkpoint(outf / ("state_%05d.pth" % r["iteration"])), ["netEncM"]).netEncM
        for split in ("train", "val"):
            images = torch.stack([x for x, _ in datasets.make_dataset("flowers", str(minidata_root / "flowers"), split)])
            assert len(images) % 2 == 0  # whole batches: the mean over batches is the mean over images
            with torch.no_grad():
                sizes = netEncM(images).mean((0, 2, 3)).tolist()
            assert r["region_sizes"][split] == pytest.approx(sizes, abs=1e-5), (r["iteration"], split)


def test_curves_mark_rollbacks_and_restarts_on_every_plot():
    events = [[], ["rollback"], ["restart"], ["resume"], ["early_restart"]]
    log = [{"step": 2 * k + 2, "losses": {"lossG": {"mean": 1.0}}, "region_sizes": {"train": [.5, .5], "val": [.5, .5]},
            "val_iou": .5, "val_acc": .5, "train_iou": .5, "label_free": {"score": 1.0}, "events": e}
           for k, e in enumerate(events)]
    figure = monitor.curves_figure(log, 0.05)
    for axes in figure.axes[:3]:
        assert [(line.get_xdata()[0], line.get_linestyle()) for line in axes.get_lines()
                if line.get_label().startswith("_")] == [(4, "--"), (6, ":"), (10, ":")]


def test_the_log_resumes_as_an_uninterrupted_run_wrote_it(minidata_root, tmp_path):
    """Stopped after scoring iteration 6 but before saving its checkpoint: the resumed run
    drops that record and writes it again, so that no record is repeated or missing."""
    data = ["--dataroot", minidata_root / "flowers"]
    run_script("train.py", *RUN, *data, "--nIteration", 7, "--outf", tmp_path / "whole", cwd=tmp_path)
    outf = tmp_path / "parts"
    run_script("train.py", *RUN, *data, "--nIteration", 5, "--outf", outf, cwd=tmp_path)
    os.remove(outf / "state_00006.pth")  # as if killed while saving it
    run_script("train.py", "--resume", "--nIteration", 7, "--outf", outf, "--silent", cwd=tmp_path)
    whole, parts = records(tmp_path / "whole"), records(outf)
    assert [trained(r) for r in parts] == [trained(r) for r in whole]
    assert [r["events"] for r in parts] == [[], [], ["resume"], []]


@pytest.mark.parametrize("damage", ["half line", "missing"])
def test_a_damaged_log_is_one_warning_and_continues_from_the_checkpoints_record(damage, minidata_root, tmp_path):
    outf = tmp_path / "out"
    run_script("train.py", *RUN, "--dataroot", minidata_root / "flowers", "--nIteration", 3, "--outf", outf,
               cwd=tmp_path)
    before = records(outf)
    if damage == "missing":
        os.remove(outf / "stats.jsonl")
    else:
        with open(outf / "stats.jsonl", "a") as f:
            f.write('{"iteration": 6, "ste')
    result = run_script("train.py", "--resume", "--nIteration", 5, "--outf", outf, "--silent", cwd=tmp_path)
    what = "missing" if damage == "missing" else "damaged or not this run's"
    assert result.stderr.splitlines() == ["warning: %s: %s; continuing it from the checkpoint's own record"
                                          % (outf / "stats.jsonl", what)]
    after = records(outf)
    assert [r["iteration"] for r in after] == ([4, 6] if damage == "missing" else [2, 4, 6])
    assert after[-2] == before[-1]  # the checkpoint's own record, as it was written


def test_each_checkpoint_prints_a_summary_line(minidata_root, tmp_path):
    args = ["--dataroot", minidata_root / "flowers", "--nIteration", 1, "--outf", tmp_path / "out"]
    result = run_script("train.py", *[a for a in RUN if a != "--silent"], *args, cwd=tmp_path)
    line, = [line for line in result.stdout.splitlines() if line.startswith("iteration 2: ")]
    record, = records(tmp_path / "out")
    assert "lossG %.3f lossD %.3f err_recZ %.3f" % tuple(record["losses"][k]["mean"] for k in
                                                          ("lossG", "lossD", "err_recZ")) in line
    assert "region sizes train %.2f %.2f, val %.2f %.2f" % tuple(record["region_sizes"]["train"] +
                                                                  record["region_sizes"]["val"]) in line
    assert "val IoU %.4f | label-free %.3f" % (record["val_iou"], record["label_free"]["score"]) in line
    assert " it/s" in line
    assert "scoring train" in result.stderr and "scoring val" in result.stderr  # progress while scoring


def tensorboard_or_skip():
    """TensorBoard's own reader; CI (which sets CI) installs tensorboard: the test never skips there."""
    if os.environ.get("CI"):
        from tensorboard.backend.event_processing import event_accumulator
        return event_accumulator
    return pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_tensorboard_gets_the_same_scalars_and_the_sample_grid(minidata_root, tmp_path):
    event_accumulator = tensorboard_or_skip()
    outf = tmp_path / "out"
    run_script("train.py", *RUN, "--dataroot", minidata_root / "flowers", "--nIteration", 3, "--outf", outf,
               "--tensorboard", cwd=tmp_path)
    run_script("train.py", "--resume", "--nIteration", 5, "--outf", outf, "--silent", cwd=tmp_path)
    events = event_accumulator.EventAccumulator(str(outf / "tensorboard"))
    events.Reload()
    log = records(outf)
    assert set(events.Tags()["scalars"]) >= {"losses/lossG/mean", "losses/lossD/last", "val_iou",
                                              "region_sizes/val/1", "iterations_per_second"}
    lossG = events.Scalars("losses/lossG/mean")
    assert [e.step for e in lossG] == [r["step"] for r in log]
    assert [e.value for e in lossG] == pytest.approx([r["losses"]["lossG"]["mean"] for r in log], rel=1e-6)
    assert [e.step for e in events.Images("sample_grid")] == [2, 4, 6]


def test_tensorboard_not_installed_is_one_line_before_training(minidata_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    result = run_script("train.py", *RUN, "--dataroot", minidata_root / "flowers", "--outf", tmp_path / "out",
                        "--tensorboard", cwd=tmp_path, check=False)
    assert one_line_error(result) == ("error: --tensorboard: the tensorboard package is not installed "
                                      "(pip install tensorboard)")
    assert not (tmp_path / "out" / "stats.jsonl").exists() and not list((tmp_path / "out").glob("state_*"))
