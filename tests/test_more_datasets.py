"""The datasets beyond the original's: built-in synthetic, your own folder, LFW + Flowers."""
import os

import numpy as np
import pytest
import torch

import datasets
import minidata
import scores
from conftest import SMALL_RUN, read_dat, run_script


def test_synthetic_images_are_deterministic_varied_and_masked():
    train_split = datasets.make_dataset("synthetic", None, "train")
    assert (len(train_split), len(datasets.make_dataset("synthetic", None, "val"))) == (2000, 200)
    x, m = train_split[7]
    x2, m2 = datasets.make_dataset("synthetic", "ignored", "train")[7]
    assert torch.equal(x, x2) and torch.equal(m, m2)
    assert x.shape == (3, 128, 128) and x.min() >= -1 and x.max() <= 1
    assert set(m.unique().tolist()) == {0.0, 1.0}
    sizes = [train_split[i][1].mean().item() for i in range(20)]
    assert 0.03 < min(sizes) and max(sizes) < 0.5 and np.std(sizes) > 0.02
    # the object differs from the background: its mean colour is not the background's
    assert (x[:, m[0] == 1].mean(1) - x[:, m[0] == 0].mean(1)).abs().sum() > 0.1
    assert not torch.equal(train_split[0][0], datasets.make_dataset("synthetic", None, "val")[0][0])


def test_synthetic_trains_end_to_end_without_data(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.SyntheticDataset, "SIZES", {"train": 8, "val": 4, "test": 4})
    outf = tmp_path / "out"
    run_script("train.py", "--dataset", "synthetic", "--outf", outf, "--nIteration", 3, "--checkpointFreq", 2,
               "--cacheData", *SMALL_RUN, cwd=tmp_path)
    assert {"out_00002.png", "out_00004.png", "state_00004.pth", "train.dat", "val.dat"} <= set(os.listdir(outf))
    for _, acc, iou in read_dat(outf / "val.dat"):
        assert 0 <= iou <= acc <= 1
    # its checkpoint is shown and scored without a --dataroot
    shown = run_script("example_load_pretrained.py", "--statePath", outf / "state_00004.pth", "--score",
                       "--split", "test", "--batch_size", 4, cwd=tmp_path)
    assert "test split of synthetic (4 images): accuracy" in shown.stdout and (tmp_path / "out.png").exists()


@pytest.mark.parametrize("n, val, test", [(12, [9], [4]), (25, [9, 19], [4, 14, 24]), (4, [3], [2])])
def test_folder_dataset_splits_and_masks(n, val, test, tmp_path):
    """Disjoint splits: of every ten images (sorted by path), the fifth for test and the
    tenth for validation; under ten, the last for validation and the one before for test."""
    minidata.make_folder(tmp_path, n=n)
    files = datasets.image_files(tmp_path / "images")
    splits = {split: datasets.make_dataset("folder", str(tmp_path / "images"), split, maskroot=str(tmp_path / "masks"))
              for split in ("train", "val", "test")}
    assert splits["val"].files == [files[i] for i in val] and splits["test"].files == [files[i] for i in test]
    assert splits["train"].files == [f for i, f in enumerate(files) if i not in val + test]
    x, m = splits["train"][0]
    assert x.shape == (3, 128, 128) and set(m.unique().tolist()) == {0.0, 1.0}
    unmasked = datasets.make_dataset("folder", str(tmp_path / "images"), "val")
    assert torch.isnan(unmasked[0][1]).all()


@pytest.mark.parametrize("with_masks", [True, False])
def test_folder_dataset_trains_end_to_end(with_masks, tmp_path):
    minidata.make_folder(tmp_path, n=20, with_masks=with_masks)
    masks = ["--maskroot", tmp_path / "masks"] if with_masks else []
    outf = tmp_path / "out"
    run_script("train.py", "--dataset", "folder", "--dataroot", tmp_path / "images", *masks, "--outf", outf,
               "--nIteration", 1, "--checkpointFreq", 2, *SMALL_RUN, cwd=tmp_path)
    (_, acc, iou), = read_dat(outf / "val.dat")
    if with_masks:
        assert 0 <= iou <= acc <= 1
    else:
        assert np.isnan(acc) and np.isnan(iou)
    assert (outf / "state_00002.pth").exists() and (outf / "out_00002.png").exists()


def test_lfw_and_flowers_together(minidata_root, tmp_path):
    outf = tmp_path / "out"
    roots = "%s,%s" % (minidata_root / "lfw", minidata_root / "flowers")
    run_script("train.py", "--dataset", "lfw+flowers", "--dataroot", roots, "--outf", outf, "--nIteration", 1,
               "--checkpointFreq", 2, *SMALL_RUN, cwd=tmp_path)
    for split in ("train", "val"):
        (_, acc, iou), = read_dat(outf / (split + ".dat"))
        assert 0 <= iou <= acc <= 1  # train: scored on the Flowers images, LFW's have no masks
    mixed = datasets.make_dataset("lfw+flowers", roots, "train")
    assert len(mixed) == 6 + 6
    result = run_script("train.py", "--dataset", "lfw+flowers", "--dataroot", minidata_root / "lfw", "--outf",
                        tmp_path / "other", *SMALL_RUN, cwd=tmp_path, check=False)
    assert "takes two folders, LFW_ROOT,FLOWERS_ROOT" in result.stderr


def test_evaluate_leaves_out_images_without_ground_truth():
    class Half(torch.nn.Module):
        def forward(self, x):
            m = torch.zeros(x.size(0), 1, 4, 4)
            m[..., :2] = 1
            return torch.cat((m, 1 - m), 1)
    known = torch.zeros(1, 1, 4, 4)
    known[..., :2] = 1
    unknown = torch.full((1, 1, 4, 4), float("nan"))
    batches = [(torch.zeros(2, 3, 4, 4), torch.cat((known, unknown))), (torch.zeros(1, 3, 4, 4), unknown)]
    acc, iou, _, _ = scores.evaluate(Half(), batches, "cpu")
    assert acc == 1 and iou == 1
    acc, iou, size, _ = scores.evaluate(Half(), batches[1:], "cpu")
    assert np.isnan(acc) and np.isnan(iou) and size == 0.5
