"""train.py under torchrun: DistributedDataParallel over 2 CPU processes (gloo)."""
import argparse
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import datasets
import distributed
import monitor
import utils
from conftest import ROOT, assert_same_checkpoint, assert_weights_retrace, run_script

RANK_SCRIPT = """
import sys, torch
sys.path.insert(0, %(root)r)
import datasets, distributed, options, scores, train, utils
sys.path.insert(0, %(tests)r)
from test_distributed import log_batches
argv = sys.argv[1:]
if %(collapses)r:  # the checkpoints (counted from 1) at which rank 0's collapse test fires
    calls = []
    scores.has_collapsed = lambda sizes, threshold: calls.append(sizes) or len(calls) in %(collapses)r
if %(signal_at)r:  # (rank, iteration, signal): that rank's first start sends it itself inside that iteration
    import os, signal
    iterate = train.training_iteration
    def training_iteration(nets, optimizers, xData, xReal, zData, opt, iteration, *rest):
        if (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
                and (int(os.environ["RANK"]), iteration) == %(signal_at)r[:2]):
            os.kill(os.getpid(), signal.Signals[%(signal_at)r[2]])
        return iterate(nets, optimizers, xData, xReal, zData, opt, iteration, *rest)
    train.training_iteration = training_iteration
opt, start = options.resolve_options(options.make_parser().parse_args(argv), options.explicit_flags(argv))
dist = distributed.Distributed.from_environment(opt)
batches = log_batches(datasets.ShardedBatchSampler)
run = train.train(opt, start, dist)
torch.save({"nets": {name: net.state_dict() for name, net in run.nets.items()}, "batches": batches,
            "rng": utils.rng_states(), "options": vars(opt), "progress": vars(run.progress)},
           "%%s/rank%%d.pt" %% (opt.outf, dist.rank))
dist.close()
"""


def log_batches(sampler_class):
    """Record every batch of indices that the training streams' samplers yield, in order."""
    batches = []
    iterate = sampler_class.__iter__

    def logged(self):
        for batch in iterate(self):
            batches.append(list(batch))
            yield batch

    sampler_class.__iter__ = logged
    return batches


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_script(tmp_path, collapses=(), signal_at=None):
    """RANK_SCRIPT, written to tmp_path: collapses forced at the checkpoints numbered
    `collapses`; signal_at = (rank, iteration, signal name): that rank's first start sends
    itself the signal inside that iteration."""
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT % {"root": ROOT, "tests": os.path.join(ROOT, "tests"), "collapses": collapses,
                                     "signal_at": signal_at})
    return script


def torchrun(script, args, cwd, nproc=2, timeout=240, max_restarts=0):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--max-restarts",
               str(max_restarts), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(script)] + [str(a) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()  # torchrun ends its processes: SIGTERM, then SIGKILL after 30 s
        stdout, stderr = process.communicate(timeout=120)
        raise AssertionError("torchrun ran out of its %d s:\n%s%s" % (timeout, stdout, stderr)) from None
    assert process.returncode == 0, stdout + stderr
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_two_processes_match_one_process_with_the_whole_batch(minidata_root, tmp_path, monkeypatch):
    args = ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--nf", 4, "--batchSize", 4,
            "--nTest", 2, "--nIteration", 3, "--checkpointFreq", 2, "--manualSeed", 6, "--workers", 0,
            "--device", "cpu", "--silent"]
    torchrun(rank_script(tmp_path), args + ["--outf", tmp_path / "ddp"], cwd=tmp_path)
    monkeypatch.setattr(datasets.ShardedBatchSampler, "__iter__", datasets.ShardedBatchSampler.__iter__)
    single_batches = log_batches(datasets.ShardedBatchSampler)
    run_script("train.py", *args, "--outf", tmp_path / "single", cwd=tmp_path, threads=1)  # as each rank's

    ddp, single = tmp_path / "ddp", tmp_path / "single"
    # files written once, by rank 0
    assert sorted(p for p in os.listdir(ddp) if not p.startswith("rank")) == sorted(os.listdir(single))
    for name in ("train.dat", "val.dat"):
        ours, theirs = (ddp / name).read_text().splitlines(), (single / name).read_text().splitlines()
        assert [line.split()[0] for line in ours] == [line.split()[0] for line in theirs] == ["2", "4"], name
        np.testing.assert_allclose([[float(v) for v in line.split()] for line in ours],
                                   [[float(v) for v in line.split()] for line in theirs], rtol=0, atol=1e-4)
    # stats.jsonl written once, by rank 0: a record per checkpoint
    assert [json.loads(line)["iteration"] for line in (ddp / "stats.jsonl").read_text().splitlines()] == [2, 4]
    rank0, rank1 = torch.load(ddp / "rank0.pt"), torch.load(ddp / "rank1.pt")
    # each rank trains on its own half of every global batch that one process takes whole
    assert len(rank0["batches"]) == len(rank1["batches"]) == len(single_batches) == 8  # 4 iterations, 2 streams
    for part0, part1, whole in zip(rank0["batches"], rank1["batches"], single_batches):
        assert part0 + part1 == whole and len(part0) == len(part1) == 2
    # identical weights and spectral-norm vectors on both ranks
    for name in rank0["nets"]:
        for key in rank0["nets"][name]:
            assert torch.equal(rank0["nets"][name][key], rank1["nets"][name][key]), (name, key)
    # batch 2 per rank on 2 ranks = batch 4 on 1, to float rounding (gradients are averaged
    # across ranks instead of within one batch). Measured on an AMD EPYC (AVX2): largest gap
    # 3.3e-6 (netEncM), 2.7e-4 (netGenX), 9.6e-5 (netDX), 1.5e-5 (netRecZ); at most 3.1% of
    # a parameter tensor beyond 1e-5. Bounds: twice that.
    a, b = utils.load_checkpoint(ddp / "state_00004.pth"), utils.load_checkpoint(single / "state_00004.pth")
    assert_weights_retrace(a, {net: b[net] for net in ("netEncM", "netGenX", "netDX", "netRecZ")},
                           bounds={"netEncM": 7e-6, "netGenX": 6e-4, "netDX": 2e-4, "netRecZ": 3e-5},
                           fraction=0.0625, free_bias_steps=range(1, 5))
    # the checkpoint holds plain state dicts that load in a single process
    assert not any(k.startswith("module.") for k in a["netGenX"])
    run_script("example_load_pretrained.py", "--statePath", ddp / "state_00004.pth", "--dataroot",
               minidata_root / "flowers", "--batch_size", 2, "--device", "cpu", cwd=tmp_path)


def test_rollbacks_and_restart_decided_by_rank_0_reach_every_rank_with_its_random_state(minidata_root, tmp_path):
    """Only rank 0 scores (its evaluation loaders draw random numbers) and decides. Collapses
    (forced) at the 3rd and 4th checkpoints send both ranks back to 4 then 2; rank 0 alone
    writes the healthy checkpoint at 6 that ends the streak, so the rollback after the 7th
    goes back to the newest (6) on both ranks only if rank 0 shares it; the collapse at the
    9th, with no rollback left, restarts every rank, each continuing from rank 0's random state."""
    outf = tmp_path / "out"
    torchrun(rank_script(tmp_path, collapses=(3, 4, 7, 9)),
             ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--nf", 4, "--batchSize", 4, "--nTest", 2,
              "--checkpointFreq", 2, "--manualSeed", 6, "--workers", 0, "--device", "cpu", "--silent", "--outf", outf,
              "--nIteration", 9, "--autoRestart", 0.1, "--rollback", 3],
             cwd=tmp_path)
    assert [int(line.split()[0]) for line in (outf / "val.dat").read_text().splitlines()] == \
        [2, 4, 6, 6, 4, 6, 8, 8, 10, 2, 4, 6, 8, 10]
    rank0, rank1 = torch.load(outf / "rank0.pt"), torch.load(outf / "rank1.pt")
    for name in rank0["nets"]:
        for key in rank0["nets"][name]:
            assert torch.equal(rank0["nets"][name][key], rank1["nets"][name][key]), (name, key)
    assert torch.equal(rank0["rng"]["torch"], rank1["rng"]["torch"])
    assert rank0["rng"]["python"] == rank1["rng"]["python"]
    assert rank0["options"] == rank1["options"] and rank0["progress"] == rank1["progress"]


def interrupted_run_flags(minidata_root):
    """A torchrun run that its own command starts or continues (--resume auto)."""
    return ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--nf", 4, "--batchSize", 4, "--nTest", 2,
            "--checkpointFreq", 2, "--manualSeed", 6, "--workers", 1, "--device", "cpu", "--silent", "--nIteration", 5,
            "--resume", "auto"]


@pytest.fixture(scope="module")
def uninterrupted(minidata_root, tmp_path_factory):
    """The output folder of interrupted_run_flags' run, never interrupted."""
    outf = tmp_path_factory.mktemp("uninterrupted")
    torchrun(os.path.join(ROOT, "train.py"), interrupted_run_flags(minidata_root) + ["--outf", outf], cwd=outf)
    return outf


def assert_ends_as_uninterrupted(outf, uninterrupted):
    assert_same_checkpoint(*(utils.load_checkpoint(folder / "state_00006.pth") for folder in (uninterrupted, outf)))
    for name in ("train.dat", "val.dat"):
        assert (outf / name).read_text() == (uninterrupted / name).read_text(), name


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_iteration_and_resume_is_exact(minidata_root, tmp_path,
                                                                                       uninterrupted):
    """Rank 1 alone gets SIGTERM inside iteration 2: both ranks stop at iteration 3, rank 0
    writes its checkpoint, both exit 0; resumed under torchrun, the run ends with the
    weights and .dat files of one never stopped."""
    args = interrupted_run_flags(minidata_root)
    outf = tmp_path / "stopped"
    result = torchrun(rank_script(tmp_path, signal_at=(1, 2, "SIGTERM")), args + ["--outf", outf], cwd=tmp_path,
                      timeout=120)
    assert "stopped by another process at iteration 3: %s holds it" % (outf / "state_00003.pth") in result.stderr
    ranks = [torch.load(outf / ("rank%d.pt" % rank)) for rank in (0, 1)]
    assert [r["progress"]["iteration"] for r in ranks] == [3, 3]
    assert sorted(p.name for p in outf.glob("state_*.pth")) == ["state_00002.pth", "state_00003.pth"]
    torchrun(os.path.join(ROOT, "train.py"), ["--resume", "--outf", outf], cwd=tmp_path)
    assert_ends_as_uninterrupted(outf, uninterrupted)


def test_torchrun_restarts_a_killed_worker_and_resume_auto_continues_exactly(minidata_root, tmp_path, uninterrupted):
    """torchrun --max-restarts 1 with one command that starts or continues (--resume auto):
    rank 1 is killed (SIGKILL) between the checkpoints at 2 and 4; torchrun restarts both
    ranks, which continue from the checkpoint at 2 and end with the weights and .dat files
    of a run never interrupted."""
    outf = tmp_path / "restarted"
    result = torchrun(rank_script(tmp_path, signal_at=(1, 3, "SIGKILL")),
                      interrupted_run_flags(minidata_root) + ["--outf", outf], cwd=tmp_path, max_restarts=1)
    assert "failed (exitcode: -9) local_rank: 1" in result.stderr  # the first start's SIGKILL, as torchrun reports it
    records = monitor.read_stats(outf / "stats.jsonl")[0]
    assert [(r["iteration"], r["events"]) for r in records] == [(2, []), (4, ["resume"]), (6, [])]
    assert_ends_as_uninterrupted(outf, uninterrupted)


def test_batch_size_must_split_evenly(minidata_root, tmp_path, monkeypatch):
    """Refused before the process group is joined: what torchrun gives each of 2 processes."""
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    result = run_script("train.py", "--dataroot", minidata_root / "flowers", "--batchSize", 3, "--nf", 4, "--device",
                        "cpu", "--outf", tmp_path, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "--batchSize 3: under torchrun it is the global batch" in result.stderr


def test_the_stop_is_agreed_over_a_cpu_group_on_gpus(monkeypatch):
    """Under torchrun with NCCL, the stop asked at every iteration goes through a gloo group of
    its own, on a CPU tensor: reading it never waits for the GPU (no host sync per iteration)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kwargs: None)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.distributed, "new_group", lambda backend: "a gloo group" if backend == "gloo" else None)
    opt = argparse.Namespace(batchSize=4, device="cuda")
    dist = distributed.Distributed.from_environment(opt)
    assert (dist.rank, dist.world, opt.device, dist.flags) == (1, 2, "cuda:1", "a gloo group")
    reduced = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, op, group: reduced.append(
        (tensor.device.type, group)) or tensor.fill_(1.0))
    assert dist.any(False) is True  # another rank's flag
    assert reduced == [("cpu", "a gloo group")]
