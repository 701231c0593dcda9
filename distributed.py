"""Several processes under torchrun: this process's place among them, what they agree on
(rank 0's decisions, this rank's slice of each batch, whether to stop), and the stop itself
(StopRequest: Ctrl-C and a scheduler's SIGTERM end every rank at the same iteration)."""
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Optional

import torch

import utils
from utils import UserError


@dataclass
class Distributed:
    """This process's place among torchrun's: rank 0 of 1 without torchrun. flags: the
    process group that agrees on host-side flags (the stop), on the CPU (gloo) whatever the
    training's backend, so that agreeing never waits for a GPU."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    flags: Optional[object] = None

    @property
    def is_main(self):
        return self.rank == 0

    @classmethod
    def from_environment(cls, opt):
        """Join torchrun's process group (RANK, WORLD_SIZE, LOCAL_RANK in the environment)
        and give this process its device: cuda:LOCAL_RANK on GPUs, else the CPU (gloo)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if opt.batchSize % world:
            raise UserError("--batchSize %d: under torchrun it is the global batch, split evenly over the %d "
                            "processes; use a multiple of %d" % (opt.batchSize, world, world))
        dist = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if torch.device(opt.device).type == "cuda":
            opt.device = "cuda:%d" % dist.local_rank
            torch.cuda.set_device(opt.device)
        torch.distributed.init_process_group("nccl" if opt.device.startswith("cuda") else "gloo",
                                             **restart_store(dist))
        if torch.distributed.get_backend() != "gloo":
            dist.flags = torch.distributed.new_group(backend="gloo")
        return dist

    def wrap(self, module):
        """module in DistributedDataParallel under torchrun (itself without). Spectral-norm
        vectors depend only on the weights, which DDP keeps equal, so every rank updates them
        alike: no buffer broadcast."""
        if self.world == 1:
            return module
        device = next(module.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

    def this_ranks_slice(self, whole):
        """This rank's slice of something drawn alike on every rank for the whole batch."""
        part = len(whole) // self.world
        return whole[self.rank * part:(self.rank + 1) * part]

    def from_main(self, obj):
        """Rank 0's obj, on every rank (obj is ignored on the others)."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def any(self, flag):
        """Whether any rank's flag is set (every rank gets the same answer: each stops at the
        same iteration). Asked at every iteration, over the CPU group `flags`: it neither
        waits for the GPU nor makes the GPU wait."""
        if self.world == 1:
            return flag
        tensor = torch.tensor([float(flag)])
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=self.flags)
        return bool(tensor.item())

    def close(self):
        if self.world > 1:
            torch.distributed.destroy_process_group()


def restart_store(dist):
    """Under torchrun, the process group's store: torchrun's own, under a prefix for each start
    of the group (TORCHELASTIC_RESTART_COUNT). With one shared by every start, a group that
    torchrun --max-restarts restarts reads the addresses of the processes it replaced and
    cannot connect (seen with gloo, torch 2.14). Elsewhere, torch's default (env://)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    prefixed = torch.distributed.PrefixStore("start_%s" % os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), store)
    return {"store": prefixed, "rank": dist.rank, "world_size": dist.world}


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler taking the machine back) ask the run to stop
    after the iteration in progress: the handlers only note the signal, so that nothing is
    interrupted halfway; a second signal while saving changes nothing (files are atomic)."""

    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # where Python runs handlers
            self.previous = {s: signal.signal(s, self.handle) for s in self.signals}
        return self

    def handle(self, signum, frame):
        if self.signal is None and utils.is_main_process():
            print("\n%s: stopping after this iteration, with a checkpoint" % signal.Signals(signum).name,
                  file=sys.stderr)
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
