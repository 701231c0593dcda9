"""Train ReDO: a mask extractor learns to segment because redrawn regions must fool a discriminator.

    python train.py --dataset flowers --nfX 32 --useSelfAttG --useSelfAttD --outf OUT --dataroot DATA --clean
"""
import functools

import torch
import torch.nn.functional as F

import models


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
