"""example_load_pretrained.py as a user runs it: published checkpoint forms, own images, scores."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import minidata
import scores
import utils
from conftest import SMALL_RUN, fixture_path, grid_shape, grid_size, original_run_flowers, run_script

SCRIPT = "example_load_pretrained.py"


@pytest.mark.parametrize("weights, columns", [
    (["--statePath", fixture_path("redo_small_nets_state.pth")], 6),
    (["--statePath", fixture_path("redo_small_nets_state.tar.gz")], 6),
    (["--statePathM", fixture_path("redo_small_netM_state.tar.gz"),
      "--statePathX", fixture_path("redo_small_nets_state.pth")], 6),
    (["--statePathM", fixture_path("redo_small_netM_state.pth")], 4),
])
def test_sample_grid_from_each_checkpoint_form(weights, columns, minidata_root, tmp_path):
    result = run_script(SCRIPT, *weights, "--dataroot", minidata_root / "flowers", "--batch_size", 3,
                        "--device", "cpu", cwd=tmp_path)
    out = tmp_path / "out.png"
    assert "wrote %s: 3 images of the train split of flowers, %d columns" % (out, columns) in result.stdout
    with Image.open(out) as img:
        assert img.size == grid_shape(rows=3, columns=columns)
        assert np.asarray(img).std() > 10
    if columns == 4:
        assert "no redraws: they need the region generators (netGenX): give --statePathX" in result.stdout


def test_lfw_defaults_to_its_test_split_and_split_can_be_chosen(minidata_root, tmp_path):
    args = ["--statePathM", fixture_path("redo_small_netM_state.pth"), "--dataroot", minidata_root / "lfw",
            "--dataset", "lfw", "--batch_size", 2, "--device", "cpu"]
    assert "of the test split of lfw" in run_script(SCRIPT, *args, cwd=tmp_path).stdout
    assert "of the val split of lfw" in run_script(SCRIPT, *args, "--split", "val", cwd=tmp_path).stdout


def test_score_prints_the_evaluate_scores_over_the_whole_split(minidata_root, tmp_path):
    result = run_script(SCRIPT, "--statePathM", fixture_path("redo_small_netM_state.tar.gz"), "--dataroot",
                        minidata_root / "cub", "--dataset", "cub", "--split", "val", "--score", "--batch_size", 3,
                        "--device", "cpu", cwd=tmp_path)
    acc, iou = map(float, re.search(r"val split of cub \(4 images\): accuracy (\S+) IoU (\S+)", result.stdout).groups())
    state = utils.load_checkpoint(fixture_path("redo_small_netM_state.pth"))
    netEncM = utils.load_nets(state, ["netEncM"]).netEncM
    loader = torch.utils.data.DataLoader(datasets.make_dataset("cub", str(minidata_root / "cub"), "val"), batch_size=3)
    ref_acc, ref_iou, _, _ = scores.evaluate(netEncM, loader, "cpu")
    assert acc == pytest.approx(ref_acc, abs=1e-4) and iou == pytest.approx(ref_iou, abs=1e-4)


def test_masks_of_own_images_at_their_own_size(tmp_path):
    own = tmp_path / "photos"
    (own / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {"a.jpg": (97, 61), "b.png": (40, 300), "sub/c.bmp": (128, 128)}
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(own / name)
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(own / "gray.png")
    (own / "notes.txt").write_text("not an image")
    result = run_script(SCRIPT, "--statePath", fixture_path("redo_small_nets_state.tar.gz"), "--images", own,
                        "--outdir", "masks", "--redraw", "--device", "cpu", cwd=tmp_path)
    assert "wrote the masks of 4 images to %s" % (tmp_path / "masks") in result.stdout
    sizes["gray.png"] = (30, 20)
    for name, size in sizes.items():
        base = tmp_path / "masks" / os.path.splitext(name)[0]
        with Image.open(str(base) + "_mask.png") as m, Image.open(str(base) + "_soft.png") as s:
            assert m.size == size and s.size == size and m.mode == "L" and s.mode == "L"
            mask, soft = np.asarray(m), np.asarray(s).astype(int)
        assert set(np.unique(mask)) <= {0, 255}
        # two regions: the binary mask of region 0 is its soft mask >= .5
        assert (mask[soft >= 129] == 255).all() and (mask[soft <= 126] == 0).all()
        for k in range(2):
            with Image.open(str(base) + "_redraw%d.png" % k) as r:
                assert r.size == size and r.mode == "RGB"
    assert not (tmp_path / "masks" / "notes_mask.png").exists()


def test_weights_saved_from_cuda_load_through_every_entry_point(weights_from_cuda, minidata_root, tmp_path):
    """Checkpoints whose storages were saved on cuda:0, as the published ones: segmenting with
    each of example_load_pretrained.py's weight flags, and train.py --iteration continuing the
    original's checkpoint, on the CPU (without CUDA, a load that maps nothing fails)."""
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(weights_from_cuda["nets.pth"], weights_only=False)
    for weights in (["--statePath", weights_from_cuda["nets.pth"]],
                    ["--statePath", weights_from_cuda["nets.pth.tar.gz"]],
                    ["--statePathM", weights_from_cuda["netM.pth"]],
                    ["--statePathM", weights_from_cuda["netM.pth.tar.gz"], "--statePathX", weights_from_cuda["nets.pth"]]):
        result = run_script(SCRIPT, *weights, "--dataroot", minidata_root / "flowers", "--batch_size", 2,
                            "--device", "cpu", cwd=tmp_path)
        assert "on cpu" in result.stdout and "wrote %s" % (tmp_path / "out.png") in result.stdout, weights
    with open(fixture_path("original_resume_run.json")) as f:
        original = json.load(f)
    outf = tmp_path / "run"
    outf.mkdir()
    shutil.copy(weights_from_cuda["state_00002.pth"], outf / "state_00002.pth")
    run_script("train.py", *original["flags"], *original["continued"], "--dataroot", original_run_flowers(tmp_path),
               "--outf", outf, "--workers", 0, "--device", "cpu", cwd=tmp_path)
    assert utils.load_checkpoint(outf / "state_00004.pth")["options"].iteration == 4


def test_our_own_training_checkpoints_load_at_their_size(minidata_root, tmp_path):
    """A run at --sizex 64: its checkpoints draw and score 64x64 images."""
    outf = tmp_path / "run"
    run_script("train.py", "--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--outf", outf,
               "--sizex", 64, "--nIteration", 1, "--checkpointFreq", 2, *SMALL_RUN, cwd=tmp_path)
    with Image.open(outf / "out_00002.png") as img:
        assert img.size == grid_size(nTest=2, nMasks=2, sizex=64)
    for name in ("state_00002.pth", "best.pth"):
        result = run_script(SCRIPT, "--statePath", outf / name, "--dataroot", minidata_root / "flowers",
                            "--batch_size", 2, "--score", "--device", "cpu", cwd=tmp_path)
        assert "loaded netEncM, netGenX, netDX, netRecZ on cpu" in result.stdout
        assert re.search(r"train split of flowers \(6 images\): accuracy 0\.\d+ IoU 0\.\d+", result.stdout)
        with Image.open(tmp_path / "out.png") as img:
            assert img.size == grid_shape(rows=2, columns=6, sizex=64)


def synthetic_weights(tmp_path):
    """The fixture's nets, as if trained on --dataset synthetic (which needs no --dataroot)."""
    state = utils.load_checkpoint(fixture_path("redo_small_nets_state.pth"))
    state["options"].dataset = "synthetic"
    torch.save(state, tmp_path / "synthetic.pth")
    return tmp_path / "synthetic.pth"


def test_images_alone_write_only_their_masks(tmp_path):
    own = tmp_path / "photos"
    own.mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(own / "a.png")
    result = run_script(SCRIPT, "--statePath", synthetic_weights(tmp_path), "--images", own, "--outdir", "masks",
                        "--device", "cpu", cwd=tmp_path)
    assert "wrote the masks of 1 images" in result.stdout
    assert sorted(os.listdir(tmp_path / "masks")) == ["a_mask.png", "a_soft.png"]
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("with_masks", [True, False])
def test_score_a_labelled_folder_of_ones_own(with_masks, tmp_path):
    minidata.make_folder(tmp_path, n=20, with_masks=True)
    masks = ["--maskroot", tmp_path / "masks"] if with_masks else []
    result = run_script(SCRIPT, "--statePath", fixture_path("redo_small_nets_state.pth"), "--dataset", "folder",
                        "--dataroot", tmp_path / "images", *masks, "--score", "--split", "val", "--device", "cpu",
                        cwd=tmp_path)
    line, = [line for line in result.stdout.splitlines() if line.startswith("val split of folder (2 images)")]
    acc, iou = (float(v) for v in re.fullmatch(r".*accuracy (\S+) IoU (\S+).*", line).groups())
    if with_masks:
        assert 0 <= iou <= acc <= 1 and line.endswith("IoU %.4f" % iou)
    else:
        assert np.isnan(acc) and line.endswith("IoU nan (no ground-truth masks: give --maskroot)")
