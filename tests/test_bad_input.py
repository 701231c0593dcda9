"""Bad input of every kind gets one clear line that names the file or flag and says what
was expected, before any work is lost; nothing unsafe is loaded."""
import io
import os
import shutil
import tarfile

import pytest
import torch
from PIL import Image

import minidata
import utils
from conftest import SMALL_RUN, fixture_path, one_line_error, run_process, run_script

SCRIPT = "example_load_pretrained.py"


def test_unreadable_own_image_is_named(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    result = run_script(SCRIPT, "--statePathM", fixture_path("redo_small_netM_state.pth"), "--images",
                        tmp_path / "broken.jpg", "--device", "cpu", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "broken.jpg: cannot decode this image" in result.stderr and "Traceback" not in result.stderr


def test_weights_of_a_dataset_on_disk_need_dataroot_or_images(tmp_path):
    result = run_script(SCRIPT, "--statePathM", fixture_path("redo_small_netM_state.pth"), "--device", "cpu",
                        cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "nothing to do: give --dataroot (images of the dataset) and/or --images" in result.stderr


def test_redraw_without_generators_says_what_is_missing(tmp_path):
    Image.new("RGB", (50, 40)).save(tmp_path / "x.png")
    result = run_script(SCRIPT, "--statePathM", fixture_path("redo_small_netM_state.pth"), "--images",
                        tmp_path / "x.png", "--redraw", "--device", "cpu", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "--redraw needs the netGenX (region generators): give --statePathX" in result.stderr


def test_folder_dataset_names_a_missing_mask_and_a_bad_image(tmp_path):
    minidata.make_folder(tmp_path, n=20)
    os.remove(tmp_path / "masks" / "a" / "img03.png")
    result = run_script("train.py", "--dataset", "folder", "--dataroot", tmp_path / "images", "--maskroot",
                        tmp_path / "masks", "--outf", tmp_path / "out", *SMALL_RUN, cwd=tmp_path, check=False)
    assert result.returncode != 0 and "no mask for a/img03.jpg" in result.stderr
    (tmp_path / "images" / "b" / "img04.jpg").write_bytes(b"not a jpeg")
    os.remove(tmp_path / "masks" / "b" / "img04.png")
    (tmp_path / "masks" / "a" / "img03.png").write_bytes(b"")
    result = run_script("train.py", "--dataset", "folder", "--dataroot", tmp_path / "images", "--outf",
                        tmp_path / "out", "--nIteration", 50, "--checkpointFreq", 100, *SMALL_RUN, cwd=tmp_path,
                        check=False)
    assert result.returncode != 0 and "img04.jpg: cannot decode this image" in result.stderr


def test_cmnist_says_when_mnist_cannot_be_had(tmp_path):
    result = run_script("train.py", "--dataset", "cmnist", "--dataroot", tmp_path / "nothing", "--outf", tmp_path,
                        *SMALL_RUN, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "MNIST is not in" in result.stderr and "could not be downloaded" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "imagenet"], "--dataset imagenet: unknown dataset (expected one of flowers, cub, lfw, cmnist, synthetic, folder, lfw+flowers)"),
    (["--sizex", "96"], "--sizex 96: expected 128 (the original's networks) or 64"),
    (["--dataset", "cmnist", "--sizex", "64"], "--sizex 64: --dataset cmnist draws 128x128 images only"),
    (["--nMasks", "1"], "--nMasks 1: ReDO needs at least 2 regions"),
    (["--batchSize", "0"], "--batchSize 0: expected a positive number"),
    (["--earlyRestart", "1"], "--earlyRestart 1.0: expected a found-again score from 0 (off) to under 1"),
    (["--nTrainScore", "1"], "--nTrainScore 1: expected 0 (the whole training split) or at least --batchSize (2) images"),
    (["--nTest", "50"], "the test split of --dataset flowers has 4 images; --nTest 50 needs at least 50: add images or lower --nTest"),
    (["--dataroot", "/nonexistent"], "--dataroot /nonexistent: no such folder"),
])
def test_bad_flags_get_one_clear_line(flags, message, minidata_root, tmp_path):
    args = ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--outf", tmp_path / "out",
            "--nIteration", 0] + SMALL_RUN + flags
    result = run_script("train.py", *args, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_dataset_file_is_named(minidata_root, tmp_path):
    import shutil
    root = tmp_path / "cub"
    shutil.copytree(minidata_root / "cub", root)
    os.remove(root / "train_val_test_split.txt")
    result = run_script("train.py", "--dataset", "cub", "--dataroot", root, "--outf", tmp_path / "out",
                        *SMALL_RUN, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "missing train_val_test_split.txt" in result.stderr and "images.txt" in result.stderr


def test_unwritable_outf_fails_before_training(minidata_root, tmp_path):
    (tmp_path / "a_file").write_text("")
    result = run_script("train.py", "--dataroot", minidata_root / "flowers", "--outf", tmp_path / "a_file" / "out",
                        *SMALL_RUN, cwd=tmp_path, check=False)
    assert "--outf %s: cannot write there" % (tmp_path / "a_file" / "out") in one_line_error(result)


@pytest.mark.parametrize("workers", [0, 1])
def test_undecodable_training_image_is_named(workers, minidata_root, tmp_path):
    root = tmp_path / "flowers"
    shutil.copytree(minidata_root / "flowers", root)
    (root / "jpg" / "image_00003.jpg").write_bytes(b"\xff\xd8\xff broken")
    result = run_script("train.py", "--dataroot", root, "--outf", tmp_path / "out", "--nIteration", 9,
                        "--checkpointFreq", 100, *SMALL_RUN, "--workers", workers, cwd=tmp_path, check=False)
    assert "image_00003.jpg: cannot decode this image" in one_line_error(result)


def test_missing_dataset_folder_names_what_is_expected(minidata_root, tmp_path):
    root = tmp_path / "flowers"
    shutil.copytree(minidata_root / "flowers", root)
    shutil.rmtree(root / "segmim")
    result = run_script("train.py", "--dataroot", root, "--outf", tmp_path / "out", *SMALL_RUN, cwd=tmp_path,
                        check=False)
    line = one_line_error(result)
    assert "missing segmim" in line and "DATAROOT/segmim/segmim_00001.jpg" in line


@pytest.fixture(scope="module")
def small_run(minidata_root, tmp_path_factory):
    outf = tmp_path_factory.mktemp("small_run")
    run_script("train.py", "--dataroot", minidata_root / "flowers", "--outf", outf, "--nIteration", 1,
               "--checkpointFreq", 2, *SMALL_RUN, cwd=outf)
    return outf


def test_truncated_checkpoint(small_run, minidata_root, tmp_path):
    outf = tmp_path / "out"
    shutil.copytree(small_run, outf)
    data = (outf / "state_00002.pth").read_bytes()
    (outf / "state_00002.pth").write_bytes(data[:1000])
    result = run_script("train.py", "--dataroot", minidata_root / "flowers", "--outf", outf, "--iteration", 2,
                        *SMALL_RUN, cwd=tmp_path, check=False)
    assert "state_00002.pth: not a readable PyTorch checkpoint" in one_line_error(result)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pth").write_text("hello")
    result = run_process("example_load_pretrained.py", "--statePath", tmp_path / "notes.pth", "--dataroot",
                         tmp_path, "--device", "cpu", cwd=tmp_path, check=False)
    assert "notes.pth: not a readable PyTorch checkpoint" in one_line_error(result)


def test_checkpoint_of_another_configuration_names_the_difference(small_run, minidata_root, tmp_path):
    result = run_script("train.py", "--dataroot", minidata_root / "flowers", "--outf", small_run, "--iteration", 2,
                        *SMALL_RUN, "--nfX", 8, "--useSelfAttD", cwd=tmp_path, check=False)
    line = one_line_error(result)
    assert "state_00002.pth: saved for another configuration: nfX=4 (this run: 8), useSelfAttD=False (this run: True)" in line


def test_iteration_warns_that_the_saved_learning_rates_are_kept(small_run, minidata_root, tmp_path):
    outf = tmp_path / "out"
    shutil.copytree(small_run, outf)
    result = run_script("train.py", "--dataroot", minidata_root / "flowers", "--outf", outf, "--iteration", 2,
                        "--nIteration", 2, *SMALL_RUN, "--lrM", 2e-5, "--lrD", 3e-4, cwd=tmp_path)
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warning == ["warning: %s: its optimizers keep their saved settings, as in the original; ignoring "
                       "--lrM 2e-05 (saved: 1e-05), --lrD 0.0003 (saved: 0.0001)" % (outf / "state_00002.pth")]


def test_resume_with_nothing_to_resume(tmp_path):
    result = run_process("train.py", "--resume", "--outf", tmp_path, *SMALL_RUN, cwd=tmp_path, check=False)
    assert "--resume: no checkpoint to resume in --outf %s" % tmp_path in one_line_error(result)


def test_iteration_without_its_state_file(minidata_root, tmp_path):
    result = run_script("train.py", "--dataroot", minidata_root / "flowers", "--outf", tmp_path, "--iteration", 500,
                        *SMALL_RUN, cwd=tmp_path, check=False)
    assert "--iteration 500: %s does not exist" % (tmp_path / "state_00500.pth") in one_line_error(result)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_crafted_checkpoint_that_would_run_code_is_refused(tmp_path):
    torch.save({"netEncM": {}, "options": RunsCode()}, tmp_path / "evil.pth")
    result = run_script("example_load_pretrained.py", "--statePath", tmp_path / "evil.pth", "--dataroot", tmp_path,
                        "--device", "cpu", cwd=tmp_path, check=False)
    assert "evil.pth: refused to load: it holds objects other than tensors and options" in one_line_error(result)
    assert not (tmp_path / "pwned").exists()


def _tar(path, members):
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_archives_are_read_safely(tmp_path, monkeypatch):
    pth = open(fixture_path("redo_small_netM_state.pth"), "rb").read()
    _tar(tmp_path / "two.tar.gz", [("a.pth", pth), ("b.pth", pth)])
    with pytest.raises(utils.UserError, match="exactly one .pth file, found 2"):
        utils.load_checkpoint(tmp_path / "two.tar.gz")
    _tar(tmp_path / "escape.tar.gz", [("../../escape.pth", pth)])
    with pytest.raises(utils.UserError, match="archive member ../../escape.pth points outside the archive"):
        utils.load_checkpoint(tmp_path / "escape.tar.gz")
    _tar(tmp_path / "big.tar.gz", [("big.pth", pth)])
    monkeypatch.setattr(utils, "MAX_ARCHIVE_MEMBER_BYTES", 1000)
    with pytest.raises(utils.UserError, match="big.pth is %d bytes" % len(pth)):
        utils.load_checkpoint(tmp_path / "big.tar.gz")
    _tar(tmp_path / "ok.tar.gz", [("notes.txt", b"hi"), ("dir/netM.pth", pth)])
    monkeypatch.setattr(utils, "MAX_ARCHIVE_MEMBER_BYTES", 1 << 30)
    assert set(utils.load_checkpoint(tmp_path / "ok.tar.gz")) == {"netEncM", "options"}


@pytest.mark.parametrize("n_images, flags, message", [
    (12, [], "the train split of --dataset folder has 10 images; --batchSize 20 needs at least 20: add images or "
             "lower --batchSize"),
    (5, ["--batchSize", 2], "the val split of --dataset folder has 1 image; --batchSize 2 needs at least 2: add "
                            "images or lower --batchSize"),
    (30, ["--batchSize", 3, "--nTest", 4], "the test split of --dataset folder has 3 images; --nTest 4 needs at "
                                           "least 4: add images or lower --nTest")])
def test_a_folder_too_small_for_the_batch_is_refused_before_training(n_images, flags, message, tmp_path):
    """A handful of one's own photos: every split must hold a whole batch (and the test split
    the sample grid's images), said before training rather than found at the first checkpoint."""
    minidata.make_folder(tmp_path, n=n_images, with_masks=False)
    result = run_script("train.py", "--dataset", "folder", "--dataroot", tmp_path / "images", "--outf",
                        tmp_path / "out", "--nf", 4, "--nTest", 1, "--workers", 0, "--device", "cpu", "--silent",
                        "--checkpointFreq", 2, "--nIteration", 3, *flags, cwd=tmp_path, check=False)
    assert one_line_error(result) == "error: " + message
    assert not (tmp_path / "out" / "val.dat").exists()
