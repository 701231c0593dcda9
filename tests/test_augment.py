"""Training on few images: --hflip and --diffAugment (off by default; the seeded retrace of
the original in test_train.py runs with both off)."""
import torch

import augment
import train
import utils
from conftest import SMALL_RUN, assert_same_checkpoint, run_script

FEW_IMAGES = ["--dataset", "flowers", "--checkpointFreq", 2, "--manualSeed", 5, "--clean", *SMALL_RUN]


def test_each_transform_on_a_case_worked_by_hand():
    x = torch.arange(1, 2 * 3 * 8 * 8 + 1, dtype=torch.float32).reshape(2, 3, 8, 8) / 400  # no zero
    moved = augment.DiffAugment(shift=torch.tensor([[1, -2], [0, 0]]))(x)
    assert torch.equal(moved[0, :, 1:, :6], x[0, :, :7, 2:])  # one row down, two columns left
    assert (moved[0, :, 0] == 0).all() and (moved[0, :, :, 6:] == 0).all()
    assert torch.equal(moved[1], x[1])
    cut = augment.DiffAugment(cutout=torch.tensor([[0, 7], [4, 4]]))(x)  # squares of side 4
    assert (cut[0, :, :2, 5:] == 0).all() and torch.equal(cut[0, :, 2:], x[0, :, 2:])  # rows -2 to 1, columns 5 to 8
    assert torch.equal(cut[0, :, :, :5], x[0, :, :, :5])
    assert (cut[1, :, 2:6, 2:6] == 0).all() and (cut[1] != 0).sum() == 3 * (64 - 16)
    grey = torch.tensor([0.2, 0.4, 0.6]).reshape(1, 3, 1, 1).repeat(1, 1, 2, 2)
    grey[..., 0, 0] = 0  # pixel means 0.4, 0.4, 0.4, 0 -> image mean 0.3
    coloured = augment.DiffAugment(brightness=torch.tensor([0.6]), saturation=torch.tensor([0.25]),
                                   contrast=torch.tensor([1.0]))(grey)
    # +0.1: (0.3, 0.5, 0.7); chroma halved around each pixel's mean (0.5, 0.5, 0.5, 0.1):
    # (0.4, 0.5, 0.6); deviation from the image mean (0.4) times 1.5
    expected = torch.full((2, 2), 0.5) + torch.tensor([-0.1, 0.0, 0.1]).reshape(3, 1, 1)
    expected[:, 0, 0] = torch.tensor([0.1, 0.1, 0.1])
    expected = (expected - 0.4) * 1.5 + 0.4
    torch.testing.assert_close(coloured[0], expected)


def test_a_real_image_and_the_composites_in_its_place_get_the_same_transform():
    torch.manual_seed(0)
    transforms = augment.DiffAugment.draw(augment.POLICIES, 3, 16)
    real = torch.randn(3, 3, 16, 16, requires_grad=True)
    composites = real.detach().repeat_interleave(2, 0).requires_grad_()  # 2 regions: 2 composites per image
    seen_real, seen_composites = transforms(real), transforms(composites)
    assert torch.equal(seen_composites[0::2], seen_real) and torch.equal(seen_composites[1::2], seen_real)
    assert not torch.equal(seen_real[0], seen_real[1])  # one transform per image
    seen_composites.sum().backward()  # differentiable: the composites' gradient reaches the masks
    assert composites.grad.abs().sum() > 0


def test_flips_mirror_the_drawn_images_only():
    x = torch.randn(4, 3, 5, 5)
    flipped = augment.flip_horizontally(x, torch.tensor([True, False, False, True]))
    assert torch.equal(flipped[0], x[0].flip(2)) and torch.equal(flipped[1:3], x[1:3])
    torch.manual_seed(0)
    assert 0.45 < augment.draw_flips(10000).float().mean() < 0.55


def what_netDX_sees(monkeypatch):
    """Record the inputs of every netDX call of the training steps: ("real", x) and ("fake", x)."""
    seen = []
    forward = train.RealAndFake.forward
    step = train.generator_step

    def real_and_fake(self, xReal, xFake):
        seen.extend((("real", xReal.detach()), ("fake", xFake.detach())))
        return forward(self, xReal, xFake)

    def generator_step(modules, optimizers, xData, zData, wrecZ, transform=None):
        def recorded(x):
            x = transform(x) if transform else x
            seen.append(("generator", x.detach()))
            return x
        return step(modules, optimizers, xData, zData, wrecZ, recorded)
    monkeypatch.setattr(train.RealAndFake, "forward", real_and_fake)
    monkeypatch.setattr(train, "generator_step", generator_step)
    return seen


def test_netDX_sees_each_real_image_and_its_composites_cut_and_shifted_alike(minidata_root, tmp_path, monkeypatch):
    """With --diffAugment translation,cutout, what netDX sees is zero where the shift and the
    cutout left nothing: the same pixels for a real image and the composites of the image in
    its place (images and composites are nowhere exactly zero)."""
    seen = what_netDX_sees(monkeypatch)
    run_script("train.py", *FEW_IMAGES, "--dataroot", minidata_root / "flowers", "--nIteration", 1,
               "--diffAugment", "translation,cutout", "--outf", tmp_path / "out", cwd=tmp_path)
    assert [kind for kind, _ in seen] == ["generator", "real", "fake"] * 2
    for step in range(2):
        generator, (_, real), (_, fake) = seen[3 * step: 3 * step + 3]
        zeros_real = (real == 0).all(1)
        assert zeros_real.float().mean(dim=(1, 2)).min() > 0.01  # a cutout and a shift: some
        assert torch.equal((fake == 0).all(1), zeros_real.repeat_interleave(2, 0))
        assert not torch.equal(zeros_real[0], zeros_real[1])
        assert (generator[1] == 0).all(0).float().mean() > 0.01  # the generator step's view is transformed too


def test_hflip_mirrors_the_batches_the_nets_get(minidata_root, tmp_path, monkeypatch):
    """The first iteration's images for netEncM and netDX, with --hflip and every flip drawn
    true, are the mirrors of those without."""
    batches = []
    iterate = train.training_iteration

    def training_iteration(nets, optimizers, xData, xReal, *rest):
        batches.append((xData, xReal))
        return iterate(nets, optimizers, xData, xReal, *rest)
    monkeypatch.setattr(train, "training_iteration", training_iteration)
    monkeypatch.setattr(augment, "draw_flips", lambda n: torch.ones(n, dtype=torch.bool))
    args = [*FEW_IMAGES, "--dataroot", minidata_root / "flowers", "--nIteration", 0]
    run_script("train.py", *args, "--outf", tmp_path / "plain", cwd=tmp_path)
    run_script("train.py", *args, "--hflip", "--outf", tmp_path / "flipped", cwd=tmp_path)
    (plain_data, plain_real), (flipped_data, flipped_real) = batches
    assert torch.equal(flipped_data, plain_data.flip(3)) and torch.equal(flipped_real, plain_real.flip(3))


def test_a_run_with_both_resumes_exactly(minidata_root, tmp_path):
    args = [*FEW_IMAGES, "--dataroot", minidata_root / "flowers", "--hflip", "--diffAugment", "color,translation,cutout"]
    run_script("train.py", *args, "--nIteration", 3, "--outf", tmp_path / "whole", cwd=tmp_path)
    run_script("train.py", *args, "--nIteration", 1, "--outf", tmp_path / "parts", cwd=tmp_path)
    run_script("train.py", "--resume", "--nIteration", 3, "--outf", tmp_path / "parts", cwd=tmp_path)
    whole = utils.load_checkpoint(tmp_path / "whole" / "state_00004.pth")
    assert_same_checkpoint(whole, utils.load_checkpoint(tmp_path / "parts" / "state_00004.pth"))
    assert whole["options"].hflip and whole["options"].diffAugment == ("color", "translation", "cutout")
