"""Train ReDO: a mask extractor learns to segment because redrawn regions must fool a discriminator.

    python train.py --dataset flowers --nfX 32 --useSelfAttG --useSelfAttD --outf OUT --dataroot DATA --clean
"""
import argparse
import functools
import os
import random
import sys

import torch
import torch.nn.functional as F
import torchvision.utils as vutils
from tqdm import tqdm

import datasets
import models
import utils
from utils import UserError


# ----------------------------------------------------------------------------- the training iteration

def make_optimizers(nets, opt):
    """Adam with betas (0, 0.9) for each net; weight decay on the mask extractor only."""
    adam = functools.partial(torch.optim.Adam, betas=(0.0, 0.9))
    optimizers = {
        "optimizerEncM": adam(nets.netEncM.parameters(), lr=opt.lrM, weight_decay=opt.wdecay),
        "optimizerGenX": adam(nets.netGenX.parameters(), lr=opt.lrG),
        "optimizerDX": adam(nets.netDX.parameters(), lr=opt.lrD),
    }
    if nets.netRecZ is not None:
        optimizers["optimizerRecZ"] = adam(nets.netRecZ.parameters(), lr=opt.lrZ)
    return optimizers


def redraw_all_regions(nets, xData, zData):
    """Masks of xData, the redrawn regions and the composites (one per region), the latter
    flattened to (B * nMasks, C, H, W) for the discriminator."""
    mEnc = nets.netEncM(xData)
    hGen, xGen = models.redraw(nets.netGenX, xData, mEnc, zData)
    return mEnc, hGen, xGen.flatten(0, 1)


def generator_step(nets, optimizers, xData, zData, wrecZ):
    """Update the mask extractor, the generators and the noise reconstructor so that every
    composite looks real to netDX and z can be recovered from the redrawn regions."""
    _, hGen, xGen = redraw_all_regions(nets, xData, zData)
    lossG = -nets.netDX(xGen).mean()
    losses = {}
    if nets.netRecZ is not None:
        err_recZ = F.mse_loss(nets.netRecZ(hGen.sum(1)), zData)
        lossG = lossG + wrecZ * err_recZ
        losses["err_recZ"] = err_recZ.detach()
    lossG.backward()
    optimizers["optimizerEncM"].step()
    optimizers["optimizerGenX"].step()
    if nets.netRecZ is not None:
        optimizers["optimizerRecZ"].step()
    losses["lossG"] = lossG.detach()
    return losses


def discriminator_step(nets, optimizers, xData, xReal, zData):
    """Hinge-loss update of netDX on real images and on composites recomputed (without
    gradient) by the just-updated nets. Real and fake go through netDX in two calls, as in
    the original: each call runs one spectral-norm power iteration."""
    nets.netDX.zero_grad()
    with torch.no_grad():
        _, _, xGen = redraw_all_regions(nets, xData, zData)
    dReal = nets.netDX(xReal)
    dFake = nets.netDX(xGen)
    lossD = F.relu(1 - dReal).mean() + F.relu(1 + dFake).mean()
    lossD.backward()
    optimizers["optimizerDX"].step()
    return {"lossD": lossD.detach()}


def training_iteration(nets, optimizers, xData, xReal, zData, opt, iteration):
    """One ReDO iteration: a generator step every gStepFreq iterations, then a discriminator
    step every dStepFreq iterations. Returns the losses of the steps taken."""
    nets.zero_grad()
    nets.train()
    losses = {}
    if iteration % opt.gStepFreq == 0:
        losses.update(generator_step(nets, optimizers, xData, zData, opt.wrecZ))
    if iteration % opt.dStepFreq == 0:
        losses.update(discriminator_step(nets, optimizers, xData, xReal, zData))
    return losses


# ----------------------------------------------------------------------------- options

def make_parser():
    p = argparse.ArgumentParser(description="Train ReDO (unsupervised object segmentation by redrawing).")
    p.add_argument('--dataset', default="flowers", help='flowers | cub | lfw | cmnist')
    p.add_argument('--dataroot', default='./data', help='path to dataset')
    p.add_argument('--nx', type=int, default=3, help='number of channels of the input image')
    p.add_argument('--sizex', type=int, default=128, help='size of the input image (only 128 is supported)')
    p.add_argument('--nz', type=int, default=32, help='size of the latent z vector')
    p.add_argument('--nMasks', type=int, default=2, help='number of masks')
    p.add_argument('--nResM', type=int, default=3, help='number of residual blocks in netM')
    p.add_argument('--nf', type=int, default=64, help='base number of filters for conv nets')
    p.add_argument('--nfD', type=int, default=None, help='specific nf for netD, default to nf')
    p.add_argument('--nfX', type=int, default=None, help='specific nf for netX, default to nf')
    p.add_argument('--nfM', type=int, default=None, help='specific nf for netM, default to nf')
    p.add_argument('--nfZ', type=int, default=None, help='specific nf for netZ, default to nf')
    p.add_argument('--useSelfAttD', action='store_true', help='use self attention for D')
    p.add_argument('--useSelfAttG', action='store_true', help='use self attention for G')
    p.add_argument('--workers', type=int, default=4, help='number of data loading workers')
    p.add_argument('--batchSize', type=int, default=20, help='input batch size')
    p.add_argument('--nTest', type=int, default=5, help='number of test images shown in the sample grids')
    p.add_argument('--nIteration', type=int, default=50000, help='number of iterations')
    p.add_argument('--initOrthoGain', type=float, default=.8, help='gain for the orthogonal initialization')
    p.add_argument('--lrG', type=float, default=1e-4, help='learning rate for G, default=1e-4')
    p.add_argument('--lrM', type=float, default=1e-5, help='learning rate for M, default=1e-5')
    p.add_argument('--lrD', type=float, default=1e-4, help='learning rate for D, default=1e-4')
    p.add_argument('--lrZ', type=float, default=1e-4, help='learning rate for Z, default=1e-4')
    p.add_argument('--gStepFreq', type=int, default=1, help='update G every x iterations')
    p.add_argument('--dStepFreq', type=int, default=1, help='update D every x iterations')
    p.add_argument('--temperature', type=float, default=1, help='softmax temperature')
    p.add_argument('--wdecay', type=float, default=1e-4, help='weight decay for M, default=1e-4')
    p.add_argument('--wrecZ', type=float, default=5, help='weight for z reconstruction (0: no netRecZ)')
    p.add_argument('--outf', default='.', help='folder to output images and model checkpoints')
    p.add_argument('--checkpointFreq', type=int, default=500, help='frequency of checkpoints')
    p.add_argument('--iteration', type=int, default=0, help='iteration to load (to resume training)')
    p.add_argument('--manualSeed', type=int, help='manual seed')
    p.add_argument('--resume', action='store_true', help='resume from the last checkpoint in --outf')
    p.add_argument('--clean', action='store_true', help='delete the previous checkpoint when saving one')
    p.add_argument('--silent', action='store_true', help='silent execution')
    p.add_argument('--autoRestart', type=float, default=0,
                   help='restart training if the ratio "size of region" / "size of image" is strictly '
                        'smaller than x on train and val at a checkpoint (collapse detected)')
    p.add_argument('--device', default=None, help='cpu | cuda | cuda:N (default: cuda if available, else cpu)')
    p.add_argument('--skipOrthoInitSN', action='store_true',
                   help="leave spectral-norm layers at PyTorch's default init, as the original's GPU runs "
                        "did (see README)")
    return p


def resolve_options(opt):
    """Options after --resume and defaults: the run's options come from OUTF/options.pth
    when resuming (except --clean, --silent, --outf), unset nf* default to --nf."""
    if opt.resume:
        path = os.path.join(opt.outf, "options.pth")
        if not os.path.isfile(path):
            raise UserError("--resume: %s does not exist (no checkpoint to resume in --outf %s)" % (path, opt.outf))
        saved = utils.load_options(path)
        saved.clean, saved.silent, saved.outf, saved.resume = opt.clean, opt.silent, opt.outf, True
        if opt.device is not None:  # the machine may have changed since
            saved.device = opt.device
        opt = saved
    if "bestValIoU" not in opt:
        opt.bestValIoU = 0
    for name in ("nfD", "nfX", "nfM", "nfZ"):
        if getattr(opt, name) is None:
            setattr(opt, name, opt.nf)
    if opt.manualSeed is None:
        opt.manualSeed = random.randint(1, 10000)
    opt.device = utils.resolve_device(getattr(opt, "device", None))
    check_options(opt)
    return opt


def check_options(opt):
    if opt.dataset not in datasets.DATASETS:
        raise UserError("--dataset %s: unknown dataset (expected one of %s)" % (opt.dataset, ", ".join(datasets.DATASETS)))
    if opt.sizex != models.SUPPORTED_SIZEX:
        raise UserError("--sizex %d: only 128 is supported (the networks are built for 128x128 images)" % opt.sizex)
    if opt.nMasks < 2:
        raise UserError("--nMasks %d: ReDO needs at least 2 regions" % opt.nMasks)
    for name in ("nx", "nz", "nResM", "nf", "nfD", "nfX", "nfM", "nfZ", "batchSize", "nTest", "checkpointFreq",
                 "gStepFreq", "dStepFreq"):
        if getattr(opt, name) < (0 if name == "nResM" else 1):
            raise UserError("--%s %s: expected a positive number" % (name, getattr(opt, name)))
    if opt.nx != 3:
        raise UserError("--nx %d: the datasets give 3-channel images" % opt.nx)
    if opt.nfM < 4:
        raise UserError("--nfM %d: the mask extractor needs at least 4 filters (it uses nfM/4)" % opt.nfM)
    if opt.workers < 0:
        raise UserError("--workers %d: expected 0 or more" % opt.workers)
    if opt.temperature <= 0:
        raise UserError("--temperature %s: expected a positive number" % opt.temperature)
    if opt.wrecZ < 0:
        raise UserError("--wrecZ %s: expected 0 (no noise reconstructor) or more" % opt.wrecZ)
    utils.resolve_device(opt.device)


# ----------------------------------------------------------------------------- data

def make_loader(dataset, batch_size, workers):
    """Shuffled batches, the last incomplete one dropped, as every loader of the original."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       drop_last=True)


class BatchStream:
    """Endless batches from a loader, a new shuffled epoch whenever one ends."""

    def __init__(self, loader):
        self.loader = loader
        self.batches = iter(loader)

    def __next__(self):
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)


class SampleGrid:
    """The fixed test images and noise shown in every out_%05d.png.

    Layout, one block of nTest + 1 rows per region (the first row left black), one row per
    test image: input, ground truth, binarized mask, soft mask, composite with the test
    noise, then nTest composites where this region's noise is replaced by a fresh one
    (the same fresh noise down a column).
    """

    def __init__(self, testset, opt, device):
        try:
            x, m = next(iter(make_loader(testset, opt.nTest, opt.workers)))
        except StopIteration:
            raise UserError("--nTest %d: larger than the test split (%d images)" % (opt.nTest, len(testset))) from None
        self.x = x.to(device)
        self.z = torch.randn((opt.nTest, opt.nMasks, opt.nz, 1, 1), device=device)
        self.zn = torch.randn((opt.nTest, opt.nz, 1, 1), device=device)
        m = m[:, :1].float()
        self.m = (m / m.amax(dim=(1, 2, 3), keepdim=True) * 2 - 1).to(device)

    @torch.no_grad()
    def render(self, nets):
        """(nMasks * (nTest + 1) * (nTest + 5), C, H, W) images in [-1, 1]."""
        x, nTest = self.x, self.x.size(0)
        masks = nets.netEncM(x)
        nMasks = masks.size(1)
        grid = torch.full((nMasks, nTest + 1, nTest + 5) + x.shape[1:], -1.0, device=x.device)
        grid[:, 1:, 0] = x
        grid[:, 1:, 1] = self.m
        soft = masks.transpose(0, 1).unsqueeze(2) * 2 - 1  # (nMasks, nTest, 1, H, W)
        grid[:, 1:, 3] = soft
        grid[:, 1:, 2] = torch.sign(soft)
        grid[:, 1:, 4] = models.redraw(nets.netGenX, x, masks, self.z)[1].transpose(0, 1)
        for k, generator in enumerate(nets.netGenX.net):
            mask = masks[:, k:k + 1]
            for i in range(nTest):
                zn = self.zn[i].expand_as(self.z[:, k])
                grid[k, 1:, i + 5] = generator(mask, zn, zn) + (1 - mask) * x
        return grid.flatten(0, 2)

    def save(self, nets, path):
        grid = self.render(nets)
        utils.atomic_write(path, lambda f: vutils.save_image(grid, f, format="png", normalize=True,
                                                             value_range=(-1, 1), nrow=self.x.size(0) + 5))


# ----------------------------------------------------------------------------- the training program

def restart_nets(nets, opt, device):
    """Fresh nets and optimizers after a collapse, drawing random numbers as the original
    does: new mask extractor, generators and discriminator; the noise reconstructor is
    re-initialised in place (its spectral-norm vectors are kept)."""
    fresh = models.build_nets(opt, device, netRecZ=nets.netRecZ)
    return fresh, make_optimizers(fresh, opt)


def checkpoint_state(nets, optimizers, opt):
    """What state_%05d.pth holds: the original's keys."""
    state = {name: net.state_dict() for name, net in nets.items()}
    state.update({name: optimizer.state_dict() for name, optimizer in optimizers.items()})
    state["options"] = opt
    return state


def load_training_state(nets, optimizers, opt):
    path = os.path.join(opt.outf, "state_%05d.pth" % opt.iteration)
    if not os.path.isfile(path):
        raise UserError("--iteration %d: %s does not exist" % (opt.iteration, path))
    state = utils.load_checkpoint(path, opt.device)
    for name, net in nets.items():
        if name not in state:
            raise UserError("%s: has no %s (was it saved with --wrecZ 0?)" % (path, name))
        try:
            net.load_state_dict(state[name])
        except RuntimeError as e:
            raise UserError("%s: %s was built for another configuration (%s)"
                            % (path, name, str(e).splitlines()[-1].strip())) from None
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(state[name])


def check_output_folder(outf):
    try:
        os.makedirs(outf, exist_ok=True)
        utils.atomic_write(os.path.join(outf, ".write_test"), lambda f: f.write(b"ok"))
        os.remove(os.path.join(outf, ".write_test"))
    except OSError as e:
        raise UserError("--outf %s: cannot write there (%s)" % (outf, e.strerror or e)) from None


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def run(opt):
    """The original's training program: returns the options at the end (iteration, bestValIoU)."""
    check_output_folder(opt.outf)
    log = (lambda *a: None) if opt.silent else print
    log("Random Seed: ", opt.manualSeed)
    seed_everything(opt.manualSeed)
    device = torch.device(opt.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    trainset, valset, testset = (datasets.make_dataset(opt.dataset, opt.dataroot, split, opt.sizex)
                                 for split in ("train", "val", "test"))
    trainloader = make_loader(trainset, opt.batchSize, opt.workers)
    nets = models.build_nets(opt, device)
    optimizers = make_optimizers(nets, opt)
    if opt.iteration > 0:
        load_training_state(nets, optimizers, opt)
    else:
        for name in ("train.dat", "test.dat", "val.dat"):
            if os.path.exists(os.path.join(opt.outf, name)):
                os.remove(os.path.join(opt.outf, name))
    grid = SampleGrid(testset, opt, device)
    valloader = make_loader(valset, opt.batchSize, opt.workers)
    genData, disData = BatchStream(trainloader), BatchStream(trainloader)
    pbar = None
    while opt.iteration <= opt.nIteration:
        if pbar is None and not opt.silent:
            pbar = tqdm(total=opt.checkpointFreq)
        if pbar is not None:
            pbar.update(1)
        xData, xReal = next(genData)[0].to(device), next(disData)[0].to(device)
        zData = torch.randn((xData.size(0), opt.nMasks, opt.nz, 1, 1), device=device)
        losses = training_iteration(nets, optimizers, xData, xReal, zData, opt, opt.iteration)
        check_finite(losses, opt.iteration)
        opt.iteration += 1
        if opt.iteration % opt.checkpointFreq != 0:
            continue
        if pbar is not None:
            pbar.close()
            pbar = None
        nets.eval()
        grid_path = os.path.join(opt.outf, "out_%05d.png" % opt.iteration)
        scores = {"train": utils.evaluate(nets.netEncM, trainloader, device),
                  "val": utils.evaluate(nets.netEncM, valloader, device)}
        for split, (acc, iou, _) in scores.items():
            log(split + ":", acc, iou)
            utils.append_line(os.path.join(opt.outf, split + ".dat"), "%d %s %s" % (opt.iteration, acc, iou))
        grid.save(nets, grid_path)
        nets.zero_grad()
        if min(scores["train"][2], scores["val"][2]) < opt.autoRestart:
            print("Training appear to have collapsed.")
            if opt.iteration <= 7000:
                print("Reinitializing training.")
                nets, optimizers = restart_nets(nets, opt, device)
                opt.iteration = 0
                continue
        save_checkpoint(nets, optimizers, opt, scores["val"][1])
        nets.train()
    if pbar is not None:
        pbar.close()
    return opt


def check_finite(losses, iteration):
    if torch.isfinite(torch.stack(list(losses.values()))).all():
        return
    for name, value in losses.items():
        if not torch.isfinite(value):
            raise UserError("iteration %d: %s is %s; training diverged. The last checkpoint in --outf is intact "
                            "(resume from it, perhaps with smaller learning rates)" % (iteration, name, value.item()))


def save_checkpoint(nets, optimizers, opt, val_iou):
    """state_%05d.pth and options.pth; best.pth when the validation IoU is the best so far;
    with --clean, the previous state file goes once the new one is complete."""
    is_best = opt.bestValIoU < val_iou
    if is_best:
        opt.bestValIoU = val_iou
    state = checkpoint_state(nets, optimizers, opt)
    utils.atomic_save(state, os.path.join(opt.outf, "state_%05d.pth" % opt.iteration))
    utils.atomic_save(opt, os.path.join(opt.outf, "options.pth"))
    if is_best:
        utils.atomic_save(state, os.path.join(opt.outf, "best.pth"))
    previous = os.path.join(opt.outf, "state_%05d.pth" % (opt.iteration - opt.checkpointFreq))
    if opt.clean and opt.iteration > opt.checkpointFreq and os.path.exists(previous):
        os.remove(previous)


def main(argv=None):
    try:
        run(resolve_options(make_parser().parse_args(argv)))
    except UserError as e:
        sys.exit("error: %s" % utils.user_error_message(e))


if __name__ == "__main__":
    main()
