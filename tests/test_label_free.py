"""The label-free score and best_unsupervised.pth (README, "Choosing a checkpoint without labels")."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import minidata
import models
import options
import runfolder
import scores
import utils
from conftest import SMALL_RUN, assert_same_tensors, run_script


def small_nets_and_inputs(n=6):
    opt = options.options_for("--dataset", "synthetic", "--nf", 4, "--nfM", 8, "--device", "cpu")
    torch.manual_seed(0)
    nets = models.build_nets(opt, torch.device("cpu"), skip_ortho_init_sn=opt.skipOrthoInitSN)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, opt.sizex, opt.sizex, generator=generator) * 2 - 1
    noise = torch.randn(n, opt.nMasks, opt.nz, 1, 1, generator=generator)
    return nets, images, noise


def test_the_score_is_deterministic_and_changes_nothing():
    """Same nets and images, same score; the run's random streams, weights, spectral-norm
    vectors, batch-norm statistics and train/eval modes are as they were."""
    nets, images, noise = small_nets_and_inputs()
    nets.train()
    before = copy.deepcopy({name: net.state_dict() for name, net in nets.items()})
    rng = torch.get_rng_state()
    first = scores.label_free_scores(nets, images, noise, 4)
    second = scores.label_free_scores(nets, images, noise, 4)
    assert first == second
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_tensors({name: net.state_dict() for name, net in nets.items()}, before)
    assert all(net.training for _, net in nets.items())
    assert 0 <= first.realism <= 1 and 0 <= first.refound <= 1 and 0 <= first.binariness <= 1
    assert first.min_region_size <= 0.5 and first.score == first.refound * first.edges


class FixedMasks(torch.nn.Module):
    """A mask extractor of two regions that ignores the images: region 0 is mask0(x)."""
    def __init__(self, mask0):
        super().__init__()
        self.mask0 = mask0
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # the device is read from a parameter

    def forward(self, x):
        m0 = self.mask0(x)
        return torch.cat([m0, 1 - m0], 1)


def test_the_parts_see_what_they_measure():
    """Hard masks are binary (1), uniform ones are not (0); a mask extractor that puts every
    pixel in one region finds that region again in every composite, and the other nowhere:
    a collapse is found again 1/2 for two regions, has no boundary, and scores 0."""
    nets, images, noise = small_nets_and_inputs()
    nets.netEncM = FixedMasks(lambda x: torch.ones_like(x[:, :1]))
    hard = scores.label_free_scores(nets, images, noise, 4)
    assert (hard.binariness, hard.refound, hard.edges, hard.score, hard.min_region_size) == (1.0, 0.5, 0.0, 0.0, 0.0)
    nets.netEncM = FixedMasks(lambda x: torch.full_like(x[:, :1], 0.5))
    assert scores.label_free_scores(nets, images, noise, 4).binariness == 0.0
    nets.netEncM = FixedMasks(lambda x: torch.full_like(x[:, :1], 0.7))  # region 1 is the smaller
    soft = scores.label_free_scores(nets, images, noise, 4)
    assert soft.binariness == pytest.approx((0.7 - 0.5) / 0.5, abs=1e-6)
    assert soft.min_region_size == pytest.approx(0.3, abs=1e-6)


class RedMasks(FixedMasks):
    """A mask extractor that looks at its input: region 0 is where the red channel is positive."""
    def __init__(self):
        super().__init__(lambda x: (x[:, :1] > 0).to(x.dtype))


class PaintRed(torch.nn.Module):
    """Region generators that paint every region pure red (+1, -1, -1)."""
    def forward(self, masks, z):
        red = torch.tensor([1.0, -1.0, -1.0], device=masks.device).view(1, 1, 3, 1, 1)
        return masks.unsqueeze(2) * red


class MeanRedness(torch.nn.Module):
    """A discriminator that calls an image as real as it is red on average."""
    def forward(self, x):
        return x[:, 0].mean((1, 2))


def test_refound_realism_and_sizes_on_composites_worked_out_by_hand():
    """Images red on their left quarter (columns 0-31), blue elsewhere; netEncM calls the red
    pixels region 0; both generators paint red. Composite 0 (the quarter repainted red) looks
    like the image; composite 1 is red all over, so netEncM finds region 0 everywhere in it.
    Over both composites, region 0 (a quarter of P pixels in each): found in the quarter of
    composite 0 and in all of composite 1, IoU (P/4 + P/4) / (P/4 + P) = 0.4; region 1
    (3P/4): found only in composite 0, IoU (3P/4) / (3P/4 + 3P/4) = 0.5; refound 0.45
    (1 if netEncM were given the images instead). Realism, with a discriminator scoring the
    mean redness: real images -0.5, composite 0 -0.5 (a tie: half), composite 1 +1 (above
    every real one): (0.5 * 0.5 + 0.5) = 0.75. The smallest region is the quarter; the red
    edge lies on the regions' boundary, 127 pixels of the 127 x 127 grid: edges 127."""
    nets, _, noise = small_nets_and_inputs(n=4)
    images = torch.full((4, 3, 128, 128), -1.0)
    images[:, 2] = 1.0
    images[:, :, :, :32] = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    nets.netEncM, nets.netGenX, nets.netDX = RedMasks(), PaintRed(), MeanRedness()
    found = scores.label_free_scores(nets, images, noise, 3)
    assert found.refound == pytest.approx(0.45, abs=1e-6)
    assert found.realism == 0.75
    assert found.min_region_size == 0.25 and found.binariness == 1.0
    assert found.edges == pytest.approx(127, rel=1e-6)
    assert found.score == pytest.approx(0.45 * 127, rel=1e-6)


def l_shaped_background(x, column):
    """Region 0 left of `column` and above row 100, region 1 elsewhere."""
    m0 = torch.ones_like(x[:, :1])
    m0[..., column:] = 0
    m0[..., 100:, :] = 0
    return m0


def test_edges_rank_boundaries_by_the_image_edges_they_lie_on():
    """Images dark left of column 40 and bright from it on have an edge on one column of the
    differences' grid (W - 1 = 127 columns): a boundary on it for 100 of its 139 pixels (the
    other 39 along row 99, across flat colour) scores 127 * 100 / 139, and so does the same
    turned a quarter (a horizontal edge); with the edge moved away, 0; images without edges, 0."""
    nets, _, noise = small_nets_and_inputs()
    images = torch.full((6, 3, 128, 128), -1.0)
    images[..., 40:] = 1.0
    nets.netEncM = FixedMasks(lambda x: l_shaped_background(x, 40))
    on_the_edge = scores.label_free_scores(nets, images, noise, 4)
    assert abs(on_the_edge.edges - 127 * 100 / 139) < 1e-3
    assert on_the_edge.score == on_the_edge.refound * on_the_edge.edges
    turned = images.transpose(-1, -2).contiguous()  # the edge on row 40, a boundary along it
    nets.netEncM = FixedMasks(lambda x: l_shaped_background(x, 40).transpose(-1, -2))
    assert scores.label_free_scores(nets, turned, noise, 4).edges == pytest.approx(127 * 100 / 139, abs=1e-3)
    nets.netEncM = FixedMasks(lambda x: l_shaped_background(x, 40))
    images[..., 40:100] = -1.0  # the edge moved to column 100, away from the boundary
    assert scores.label_free_scores(nets, images, noise, 4).edges == 0.0
    assert scores.label_free_scores(nets, torch.zeros_like(images), noise, 4).edges == 0.0


def test_a_folder_without_masks_keeps_its_best_label_free_checkpoint_and_it_loads(tmp_path, monkeypatch):
    """best_unsupervised.pth is the checkpoint of the best score (here set to peak at the
    second of four checkpoints), written without ground truth, and example_load_pretrained.py
    segments with it."""
    real_scores, chosen = scores.label_free_scores, iter([0.2, 0.6, 0.4, 0.1])
    monkeypatch.setattr(scores, "label_free_scores",
                        lambda *args: real_scores(*args)._replace(score=next(chosen)))
    minidata.make_folder(tmp_path, n=20, with_masks=False)
    outf = tmp_path / "out"
    result = run_script("train.py", "--dataset", "folder", "--dataroot", tmp_path / "images", "--outf", outf,
                        "--nIteration", 7, "--checkpointFreq", 2, *[a for a in SMALL_RUN if a != "--silent"],
                        cwd=tmp_path)
    with open(outf / "stats.jsonl") as f:
        assert [json.loads(line)["label_free"]["score"] for line in f] == [0.2, 0.6, 0.4, 0.1]
    saved = utils.load_checkpoint(outf / "best_unsupervised.pth")
    assert saved["options"].iteration == 4 and runfolder.Progress.of_checkpoint(saved).bestLabelFree == 0.6
    state = utils.load_checkpoint(outf / "state_00004.pth")
    nets = ("netEncM", "netGenX", "netDX", "netRecZ")
    assert_same_tensors({name: saved[name] for name in nets}, {name: state[name] for name in nets})
    assert not (outf / "best.pth").exists()
    assert "best label-free score 0.600 at iteration 4" in result.stdout
    assert "segment with: python example_load_pretrained.py --statePath %s" % (outf / "best_unsupervised.pth") \
        in result.stdout
    loaded = run_script("example_load_pretrained.py", "--statePath", outf / "best_unsupervised.pth",
                        "--images", tmp_path / "images" / "a", "--outdir", tmp_path / "masks", "--device", "cpu",
                        cwd=tmp_path)
    assert "wrote the masks of 10 images" in loaded.stdout


def test_each_region_is_redrawn_whole(monkeypatch):
    """The generators get hard masks (each pixel in its most likely region): soft masks would
    leave the composites close to the images, and the regions trivially found again."""
    nets, images, noise = small_nets_and_inputs()
    given, redraw = [], models.redraw
    monkeypatch.setattr(models, "redraw",
                        lambda netGenX, x, masks, z: given.append(masks) or redraw(netGenX, x, masks, z))
    scores.label_free_scores(nets, images, noise, 4)
    with utils.eval_mode(nets.netEncM), torch.no_grad():
        hard = F.one_hot(nets.netEncM(images).argmax(1), 2).permute(0, 3, 1, 2).float()
    assert torch.equal(torch.cat(given), hard)
