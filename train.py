"""Train ReDO: a mask extractor learns to segment because redrawn regions must fool a discriminator.

    python train.py --dataset flowers --dataroot DATA --outf OUT --preset paper

Top to bottom: the optimizers, the two steps of the paper (generator_step, discriminator_step)
and training_iteration(); TrainingRun, what a run holds between iterations (set up, one
iteration, judging a checkpoint and deciding what to do, following that decision, stopping);
train(), the loop; main(). The command line is options.py, the run folder runfolder.py,
torchrun and the signals distributed.py, the logs and sample grids monitor.py.
"""
import argparse
import contextlib
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

import augment
import datasets
import models
import monitor
import options
import runfolder
import scores
import utils
from distributed import Distributed, StopRequest
from runfolder import Progress
from utils import UserError


# ----------------------------------------------------------------------------- the training iteration

# each optimizer: the net it updates, the flag of its learning rate, of its weight decay
OPTIMIZER_FLAGS = {
    "optimizerEncM": ("netEncM", "lrM", "wdecay"),
    "optimizerGenX": ("netGenX", "lrG", None),
    "optimizerDX": ("netDX", "lrD", None),
    "optimizerRecZ": ("netRecZ", "lrZ", None),
}


def make_optimizers(nets, opt, fused=True):
    """Adam with betas (0, 0.9) for each net; weight decay on the mask extractor only.
    Fused: one kernel per step instead of several per parameter (the same formula); the
    original's is unfused (fused=False)."""
    optimizers = {}
    for name, (net, lr, wdecay) in OPTIMIZER_FLAGS.items():
        if getattr(nets, net) is not None:
            optimizers[name] = torch.optim.Adam(getattr(nets, net).parameters(), betas=(0.0, 0.9), fused=fused,
                                                lr=getattr(opt, lr), weight_decay=getattr(opt, wdecay) if wdecay else 0)
    return optimizers


def load_optimizer_state(optimizer, state):
    """Load an Adam state saved by any implementation (the original's, which loops over
    parameters) into our fused Adam. The saved learning rate and weight decay replace the
    optimizer's, as torch's load_state_dict does in the original."""
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError("the saved optimizer state has %d parameter groups, not %d"
                         % (len(state["param_groups"]), len(optimizer.param_groups)))
    groups = [dict(saved, fused=ours["fused"], foreach=ours["foreach"])
              for saved, ours in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict(dict(state, param_groups=groups))


def overridden_flags(name, state, opt):
    """The flags of optimizer `name` whose value on the command line differs from the one
    saved in its state (which is used): ["--lrM 2e-05 (saved: 0.0001)", ...]."""
    _, lr, wdecay = OPTIMIZER_FLAGS[name]
    saved = state["param_groups"][0]
    return ["--%s %s (saved: %s)" % (flag, getattr(opt, flag), saved[key])
            for flag, key in ((lr, "lr"), (wdecay, "weight_decay"))
            if flag and getattr(opt, flag) != saved[key]]


class RealAndFake(torch.nn.Module):
    """netDX on real images, then on composites: two calls, as the original (each runs one
    spectral-norm power iteration), in one forward, as DistributedDataParallel needs."""

    def __init__(self, netDX):
        super().__init__()
        self.netDX = netDX

    def forward(self, xReal, xFake):
        return self.netDX(xReal), self.netDX(xFake)


@dataclass
class StepModules:
    """What the training steps call: the nets themselves, or under torchrun their
    DistributedDataParallel wrappers (netDX stays bare for the generator step, where its
    gradients are not wanted)."""
    netEncM: torch.nn.Module
    netGenX: torch.nn.Module
    netDX: torch.nn.Module
    netRecZ: Optional[torch.nn.Module]
    realAndFake: torch.nn.Module

    @classmethod
    def for_nets(cls, nets, wrap=lambda module: module):
        """wrap: Distributed.wrap, under torchrun."""
        return cls(netEncM=wrap(nets.netEncM), netGenX=wrap(nets.netGenX), netDX=nets.netDX,
                   netRecZ=wrap(nets.netRecZ) if nets.netRecZ is not None else None,
                   realAndFake=wrap(RealAndFake(nets.netDX)))


def redraw_all_regions(modules, xData, zData):
    """Masks of xData, the redrawn regions and the composites (one per region), the latter
    flattened to (B * nMasks, C, H, W) for the discriminator."""
    mEnc = modules.netEncM(xData)
    hGen, xGen = models.redraw(modules.netGenX, xData, mEnc, zData)
    return mEnc, hGen, xGen.flatten(0, 1)


@contextlib.contextmanager
def frozen(net):
    """No parameter gradients for net inside the block (gradients still flow through it)."""
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def generator_step(modules, optimizers, xData, zData, wrecZ, transform=None):
    """Update the mask extractor, the generators and the noise reconstructor so that every
    composite looks real to netDX and z can be recovered from the redrawn regions. transform:
    what netDX sees of the composites (--diffAugment), when not the composites themselves."""
    _, hGen, xGen = redraw_all_regions(modules, xData, zData)
    with frozen(modules.netDX):  # its gradients would be discarded: the D step starts from zero
        lossG = -modules.netDX(transform(xGen) if transform else xGen).mean()
    losses = {}
    if modules.netRecZ is not None:
        err_recZ = F.mse_loss(modules.netRecZ(hGen.sum(1)), zData)
        lossG = lossG + wrecZ * err_recZ
        losses["err_recZ"] = err_recZ.detach()
    lossG.backward()
    optimizers["optimizerEncM"].step()
    optimizers["optimizerGenX"].step()
    if modules.netRecZ is not None:
        optimizers["optimizerRecZ"].step()
    losses["lossG"] = lossG.detach()
    return losses


def discriminator_step(modules, optimizers, xData, xReal, zData, transform=None):
    """Hinge-loss update of netDX on real images and on composites recomputed (without
    gradient) by the just-updated nets. transform: the same transform of each real image and
    of the composites of the image in its place (--diffAugment)."""
    modules.netDX.zero_grad()
    with torch.no_grad():
        _, _, xGen = redraw_all_regions(modules, xData, zData)
    if transform:
        xReal, xGen = transform(xReal), transform(xGen)
    dReal, dFake = modules.realAndFake(xReal, xGen)
    lossD = F.relu(1 - dReal).mean() + F.relu(1 + dFake).mean()
    lossD.backward()
    optimizers["optimizerDX"].step()
    return {"lossD": lossD.detach()}


def training_iteration(nets, optimizers, xData, xReal, zData, opt, iteration, modules=None,
                       augmentations=(None, None)):
    """One ReDO iteration: a generator step every gStepFreq iterations, then a discriminator
    step every dStepFreq iterations. Returns the losses of the steps taken. `modules`: what
    the steps call, when not the nets themselves (torchrun); `augmentations`: the transforms
    of what netDX sees in each step (--diffAugment)."""
    modules = modules or StepModules.for_nets(nets)
    nets.zero_grad()
    nets.train()
    losses = {}
    if iteration % opt.gStepFreq == 0:
        losses.update(generator_step(modules, optimizers, xData, zData, opt.wrecZ, augmentations[0]))
    if iteration % opt.dStepFreq == 0:
        losses.update(discriminator_step(modules, optimizers, xData, xReal, zData, augmentations[1]))
    return losses


# ----------------------------------------------------------------------------- the training run

@dataclass
class Decision:
    """What rank 0 decides at a checkpoint and every rank follows: the run's progress, the
    random states (rank 0's scoring drew from them) and what to do next: None (go on),
    "restart" (after a collapse), "early_restart" (a start gone wrong) or "rollback"."""
    action: Optional[str]
    progress: Progress
    rng: dict


def timed(function, *args):
    """function(*args) and the seconds it took."""
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def check_finite(losses, iteration):
    if torch.isfinite(torch.stack(list(losses.values()))).all():
        return
    for name, value in losses.items():
        if not torch.isfinite(value):
            raise UserError("iteration %d: %s is %s; training diverged. The last checkpoint in --outf is intact "
                            "(resume from it, perhaps with smaller learning rates)" % (iteration, name, value.item()))


def recovery_action(opt, progress, split_scores, label_free):
    """What the run does about a checkpoint gone wrong, told on stdout: after a collapse (the
    --autoRestart test), "rollback" (--rollback, while some are left and a checkpoint
    exists) or "restart" (the original's, up to RESTARTS_UNTIL; later None, as the
    original); without a collapse, "early_restart" for a start gone wrong
    (early_restart_due), else None."""
    if not scores.has_collapsed([split_scores["train"].min_region_size, split_scores["val"].min_region_size],
                                opt.autoRestart):
        return "early_restart" if early_restart_due(opt, progress, label_free.refound) else None
    print("Training appear to have collapsed.")
    if progress.rollbacks < opt.rollback and runfolder.checkpoint_files(opt.outf):
        print("Rolling back to %s (rollback %d of %d), with fresh noise and data order."
              % (runfolder.rollback_target(opt.outf, progress.rollbacksInARow), progress.rollbacks + 1, opt.rollback))
        return "rollback"
    if progress.iteration > options.RESTARTS_UNTIL:
        return None
    print("Reinitializing training.")
    return "restart"


def early_restart_due(opt, progress, refound):
    """--earlyRestart: whether the first checkpoint of a start (from scratch) has a found-again
    score (refound, scores.label_free_scores) under x, while restarts are left. Such a start
    has settled on a region netEncM does not find again in its composites, and stays there
    until the collapse test fires (docs/label-free.md)."""
    if not (progress.iteration == opt.checkpointFreq and refound < opt.earlyRestart
            and progress.earlyRestarts < options.EARLY_RESTARTS):
        return False
    print("Found-again score %.3f under --earlyRestart %s at the first checkpoint: restarting from scratch "
          "(%d of %d)." % (refound, opt.earlyRestart, progress.earlyRestarts + 1, options.EARLY_RESTARTS))
    return True


class TrainingRun:
    """What a run holds between iterations: data, nets, optimizers, its progress and its
    monitor. Set up as the original sets up, drawing random numbers in its order (start_fresh);
    or from a checkpoint `start` (path, state), continuing exactly where it was saved
    (continue_from)."""

    def __init__(self, opt, start=None, dist=None):
        self.opt = opt
        self.dist = dist or Distributed()
        self.device = torch.device(opt.device)
        utils.tune_for_device(self.device)
        self.log = print if self.dist.is_main and not opt.silent else (lambda *a: None)
        self.log("Random Seed: ", opt.manualSeed)
        self.bfloat16, precision = utils.use_bfloat16(opt.amp, self.device)
        if opt.amp != "none":
            self.log("Training in %s" % precision)
        utils.seed_everything(opt.manualSeed)
        splits = {split: self.load_split(split) for split in datasets.SPLITS}
        options.check_split_sizes(splits, opt)
        self.pin_memory = self.device.type == "cuda"  # batches copied to the GPU while it computes
        self.trainloader = datasets.make_loader(splits["train"], opt.batchSize, opt.workers, self.pin_memory)
        self.train_score_loader = self.trainloader if not opt.nTrainScore else datasets.make_loader(
            torch.utils.data.Subset(splits["train"], range(min(opt.nTrainScore, len(splits["train"])))),
            opt.batchSize, opt.workers, self.pin_memory)
        self.build_training()
        resume = None
        if start is None:
            self.start_fresh(splits)
        else:
            resume = self.continue_from(*start, splits)
        writes = self.dist.is_main
        self.monitor = (monitor.Monitor.resumed(opt, self.device, self.log, writes, resume) if resume else
                        monitor.Monitor(opt, self.device, self.log, writes))
        if start is not None:
            self.monitor.events.append("resume")

    def load_split(self, split):
        opt = self.opt
        dataset = datasets.make_dataset(opt.dataset, opt.dataroot, split, opt.sizex, opt.maskroot)
        if opt.cacheData:
            dataset = datasets.InMemoryDataset(dataset, opt.workers)
            self.log("cached the %s split in memory: %d images, %.0f MB" % (split, len(dataset), dataset.nbytes() / 2**20))
        return dataset

    def build_training(self, netRecZ=None):
        """The nets (compiled in place with --compile: the checkpoints keep their keys), their
        optimizers and what the steps call; at a restart, netRecZ is the one to re-initialise."""
        opt = self.opt
        self.nets = models.build_nets(opt, self.device, netRecZ=netRecZ, skip_ortho_init_sn=opt.skipOrthoInitSN)
        if opt.compile:
            models.compile_nets(self.nets)
        self.optimizers = make_optimizers(self.nets, opt)
        self.modules = StepModules.for_nets(self.nets, self.dist.wrap)

    def start_fresh(self, splits):
        """A new run: the sample grid and the batch streams drawn as the original draws them;
        a replaced run's logs go."""
        if self.dist.is_main:
            runfolder.remove_logs(self.opt.outf)
        self.progress = Progress()
        self.set_up_draws(splits)

    def continue_from(self, path, state, splits):
        """From a checkpoint: ours (with "resume", returned) continue exactly, data streams,
        random states and logs included; the original's give their weights to a run that
        otherwise starts anew. --resume continues the checkpoint's progress, --iteration N
        only its iteration."""
        self.load_nets_and_optimizers(path, state)
        resume = state.get("resume")
        self.progress = Progress.of_checkpoint(state) if self.opt.resume else Progress(iteration=self.opt.iteration)
        self.set_up_draws(splits, resume)
        if resume is not None:
            if self.dist.is_main:
                runfolder.truncate_score_logs(self.opt.outf, resume["datLines"])
            utils.restore_rng_states(resume["rng"])
        return resume

    def set_up_draws(self, splits, resume=None):
        """The sample grid and the batch streams, drawn in the original's order or restored from
        `resume`; between them, the validation loader and the label-free score's inputs."""
        if resume is None:
            self.grid = monitor.SampleGrid.draw(splits["test"], self.opt, self.device)
        else:
            self.grid = monitor.SampleGrid(**{k: v.to(self.device) for k, v in resume["sampleGrid"].items()})
        self.valloader = datasets.make_loader(splits["val"], self.opt.batchSize, self.opt.workers, self.pin_memory)
        self.label_free_images, self.label_free_noise = scores.label_free_inputs(splits["val"], self.opt.nMasks,
                                                                                 self.opt.nz)
        self.genData = self.batch_stream(resume and resume["genData"])
        self.disData = self.batch_stream(resume and resume["disData"])

    def batch_stream(self, state=None):
        """Endless training batches (this rank's share of each), from `state` or a new epoch."""
        return datasets.BatchStream(self.trainloader.dataset, self.opt.batchSize, self.opt.workers, state,
                                    rank=self.dist.rank, world=self.dist.world, pin_memory=self.pin_memory)

    def load_nets_and_optimizers(self, path, state):
        runfolder.check_same_networks(state["options"], self.opt, path)
        for name, net in self.nets.items():
            utils.load_weights(net, state, name, path)
        overridden = []
        for name, optimizer in self.optimizers.items():
            overridden += overridden_flags(name, state[name], self.opt)
            load_optimizer_state(optimizer, state[name])
        if overridden:
            utils.warn("%s: its optimizers keep their saved settings, as in the original; ignoring %s"
                       % (path, ", ".join(overridden)))

    def autocast(self):
        """Mixed precision (--amp) for the training iterations; scores stay in fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bfloat16)

    # -------------------------------------------------------------- an iteration (every rank)

    def train_one_iteration(self):
        """The next batches, their noise and augmentations (drawn alike on every rank for the
        whole batch, each rank taking its slice), then training_iteration()."""
        opt, dist = self.opt, self.dist
        xData = next(self.genData)[0].to(self.device, non_blocking=True)
        xReal = next(self.disData)[0].to(self.device, non_blocking=True)
        batch = xData.size(0) * dist.world
        zData = dist.this_ranks_slice(models.draw_noise(batch, opt.nMasks, opt.nz, self.device))
        if opt.hflip:
            xData = augment.flip_horizontally(xData, dist.this_ranks_slice(augment.draw_flips(batch)))
            xReal = augment.flip_horizontally(xReal, dist.this_ranks_slice(augment.draw_flips(batch)))
        augmentations = (None, None)
        if opt.diffAugment:
            augmentations = tuple(augment.DiffAugment.draw(opt.diffAugment, batch, opt.sizex).map(dist.this_ranks_slice)
                                  for _ in ("generator step", "discriminator step"))
        with self.autocast():
            losses = training_iteration(self.nets, self.optimizers, xData, xReal, zData, opt,
                                        self.progress.iteration, self.modules, augmentations)
        check_finite(losses, self.progress.iteration)
        self.progress.iteration += 1
        self.monitor.add(losses, self.progress.iteration)

    # -------------------------------------------------------------- judging a checkpoint (rank 0)

    def end_of_period(self):
        """At a checkpoint, rank 0 judges the nets (scores with and without labels, the sample
        grid), decides what the run does next, records the period, and saves the checkpoint
        when the run goes on. Returns the Decision every rank follows (follow())."""
        opt = self.opt
        self.monitor.close_bar()
        training_seconds = self.monitor.period_seconds()
        start = time.perf_counter()
        split_scores = self.score()
        for split, (acc, iou, _, _) in split_scores.items():
            self.log(split + ":", acc, iou)
        runfolder.append_scores(opt.outf, self.progress.iteration, split_scores)
        label_free, label_free_seconds = timed(self.label_free_score)
        with utils.eval_mode(*(net for _, net in self.nets.items())):
            grid = self.grid.save(self.nets, runfolder.sample_grid_path(opt.outf, self.progress.iteration))
        action = recovery_action(opt, self.progress, split_scores, label_free)
        self.monitor.record(self.progress.iteration, split_scores, label_free, action, grid,
                            {"training": training_seconds, "scoring": time.perf_counter() - start,
                             "label_free": label_free_seconds})
        if action is None:
            self.save_checkpoint(*self.progress.note_checkpoint(split_scores["val"].iou, label_free.score))
        elif action == "early_restart":
            runfolder.drop_last_scores(opt.outf)  # nothing is kept of the abandoned start but its record
        return Decision(action, replace(self.progress), utils.rng_states())

    def score(self):
        """Accuracy, IoU and smallest region size of the mask extractor on the train split (its
        first --nTrainScore images) and the validation split."""
        return {split: scores.evaluate(self.nets.netEncM, loader, self.device,
                                       None if self.opt.silent else "scoring %s" % split)
                for split, loader in (("train", self.train_score_loader), ("val", self.valloader))}

    def label_free_score(self):
        """The label-free scores of the masks on the first validation images (no ground truth
        read, no random number drawn)."""
        return scores.label_free_scores(self.nets, self.label_free_images, self.label_free_noise)

    def save_checkpoint(self, best=False, best_label_free=False):
        """The checkpoint files (runfolder.write_checkpoint); with --clean, the stale ones go once
        the new one is complete."""
        opt = self.opt
        runfolder.write_checkpoint(self.state_dict(), opt.outf, self.progress.iteration, best, best_label_free)
        if opt.clean:
            for path in runfolder.stale_checkpoints(opt, self.progress.iteration):
                utils.remove_if_present(path)

    def state_dict(self):
        """The original's keys (the nets, the optimizers, the options with the iteration and the
        best validation IoU), and under 'resume' what continuing exactly needs."""
        state = {name: net.state_dict() for name, net in self.nets.items()}
        state.update({name: optimizer.state_dict() for name, optimizer in self.optimizers.items()})
        state["options"] = argparse.Namespace(**dict(vars(self.opt), iteration=self.progress.iteration,
                                                     bestValIoU=self.progress.bestValIoU))
        state["resume"] = {
            "progress": asdict(self.progress),
            "genData": self.genData.state_dict(), "disData": self.disData.state_dict(),
            "sampleGrid": self.grid.state_dict(), "rng": utils.rng_states(),
            "datLines": runfolder.log_lengths(self.opt.outf),
            **self.monitor.state_dict()}
        return state

    # -------------------------------------------------------------- following the decision (every rank)

    def follow(self, decision):
        """Every rank takes rank 0's decision at a checkpoint."""
        if not self.dist.is_main:
            self.monitor.start_period()
        utils.restore_rng_states(decision.rng)
        self.progress = decision.progress
        if decision.action == "early_restart":
            self.progress.earlyRestarts += 1
        if decision.action in ("restart", "early_restart"):
            self.restart()
        elif decision.action == "rollback":
            self.rollback()

    def restart(self):
        """Fresh nets and optimizers after a collapse, drawing random numbers as the original
        does (its noise reconstructor is re-initialised in place); the data streams go on."""
        self.build_training(netRecZ=self.nets.netRecZ)
        self.progress.iteration = 0

    def rollback(self):
        """Back to runfolder.rollback_target() after a collapse, with fresh noise and a fresh data
        order (seeded from --manualSeed and the rollback's number, alike on every rank), so that
        the same collapse is not replayed."""
        progress = self.progress
        path = runfolder.rollback_target(self.opt.outf, progress.rollbacksInARow)
        state = utils.load_checkpoint(path, "cpu")
        progress.collapsedAt = max(progress.collapsedAt, progress.iteration)
        progress.rollbacks += 1
        progress.rollbacksInARow += 1
        self.load_nets_and_optimizers(path, state)
        progress.iteration = Progress.of_checkpoint(state).iteration
        utils.seed_everything(utils.derived_seed(self.opt.manualSeed, progress.rollbacks))
        self.genData, self.disData = self.batch_stream(), self.batch_stream()

    def stop(self, signum):
        """Asked to stop (SIGINT, SIGTERM): a checkpoint of this very iteration, unless the
        period's checkpoint was just written, and one line on how to continue."""
        opt, iteration = self.opt, self.progress.iteration
        if self.dist.is_main:
            if iteration % opt.checkpointFreq:
                self.save_checkpoint(*self.progress.note_checkpoint())
            by = signal.Signals(signum).name if signum else "another process"
            path = runfolder.state_path(opt.outf, iteration)
            if os.path.exists(path):
                print("stopped by %s at iteration %d: %s holds it; continue with: python train.py --resume --outf %s"
                      % (by, iteration, path, opt.outf), file=sys.stderr)
            else:
                print("stopped by %s before training began" % by, file=sys.stderr)
            self.log(runfolder.summary(opt, self.progress, self.monitor.records))
        self.dist.barrier()


# ----------------------------------------------------------------------------- the loop

def train(opt, start=None, dist=None):
    """ReDO's training, as the original: iterations until --nIteration; at the end of every
    period of --checkpointFreq iterations rank 0 judges the nets and decides (save and go on,
    or recover from a collapse or a start gone wrong) and every rank follows. A signal stops
    every rank at the same iteration, with a checkpoint. Returns the TrainingRun at its end."""
    dist = dist or Distributed()
    if dist.is_main:
        runfolder.check_output_folder(opt.outf)
        if start is None and opt.overwrite:
            runfolder.remove_run_files(opt.outf)
    dist.barrier()
    run = TrainingRun(opt, start, dist)
    stopped = False
    with StopRequest() as stop:
        while run.progress.iteration <= opt.nIteration:
            stopped = dist.any(stop.signal is not None)
            if stopped:
                break
            run.train_one_iteration()
            if run.progress.iteration % opt.checkpointFreq == 0:
                run.follow(dist.from_main(run.end_of_period() if dist.is_main else None))
        run.monitor.close()
        if stopped:
            run.stop(stop.signal)
        else:
            run.log(runfolder.summary(opt, run.progress, run.monitor.records))
    return run


def main(argv=None):
    dist = Distributed()
    try:
        opt, start = options.resolve_options(options.make_parser().parse_args(argv), options.explicit_flags(argv))
        dist = Distributed.from_environment(opt)
        train(opt, start, dist)
    except UserError as e:
        sys.exit("error: %s" % utils.user_error_message(e))
    finally:
        dist.close()


if __name__ == "__main__":
    main()
