"""train.py under torchrun: DistributedDataParallel over 2 CPU processes (gloo)."""
import os
import socket
import subprocess
import sys

import torch

import utils
from conftest import ROOT, run_script

RANK_SCRIPT = """
import sys, torch
sys.path.insert(0, %(root)r)
import train
argv = sys.argv[1:]
opt, checkpoint = train.resolve_options(train.make_parser().parse_args(argv), train.explicit_flags(argv))
dist = train.Distributed.from_environment(opt)
run = train.train(opt, checkpoint, dist)
torch.save({name: net.state_dict() for name, net in run.nets.items()}, "%%s/rank%%d.pt" %% (opt.outf, dist.rank))
dist.close()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, args, cwd, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script)] + [str(a) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_two_processes_match_one_process_with_the_whole_batch(minidata_root, tmp_path):
    args = ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--nf", 4, "--batchSize", 4,
            "--nTest", 2, "--nIteration", 3, "--checkpointFreq", 2, "--manualSeed", 6, "--workers", 0,
            "--device", "cpu", "--silent"]
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT % {"root": ROOT})
    torchrun(script, args + ["--outf", tmp_path / "ddp"], cwd=tmp_path)
    run_script("train.py", *args, "--outf", tmp_path / "single", cwd=tmp_path)

    ddp, single = tmp_path / "ddp", tmp_path / "single"
    # files written once, by rank 0
    assert sorted(p for p in os.listdir(ddp) if not p.startswith("rank")) == sorted(os.listdir(single))
    assert [line.split()[0] for line in (ddp / "val.dat").read_text().splitlines()] == ["2", "4"]
    # identical weights and spectral-norm vectors on both ranks
    rank0, rank1 = torch.load(ddp / "rank0.pt"), torch.load(ddp / "rank1.pt")
    for name in rank0:
        for key in rank0[name]:
            assert torch.equal(rank0[name][key], rank1[name][key]), (name, key)
    # batch 2 per rank on 2 ranks = batch 4 on 1, to float rounding (gradients are averaged
    # across ranks instead of within one batch)
    a, b = utils.load_checkpoint(ddp / "state_00004.pth"), utils.load_checkpoint(single / "state_00004.pth")
    for name in ("netEncM", "netGenX", "netDX", "netRecZ"):
        diffs = torch.cat([(a[name][k] - b[name][k]).abs().flatten() for k in a[name]])
        assert diffs.max() < 2e-3 and (diffs > 1e-5).float().mean() < 0.1, name
    for name in ("train.dat", "val.dat"):
        for x, y in zip((ddp / name).read_text().split(), (single / name).read_text().split()):
            assert abs(float(x) - float(y)) < 1e-4, name
    # the checkpoint holds plain state dicts that load in a single process
    assert not any(k.startswith("module.") for k in a["netGenX"])
    run_script("example_load_pretrained.py", "--statePath", ddp / "state_00004.pth", "--dataroot",
               minidata_root / "flowers", "--batch_size", 2, "--device", "cpu", cwd=tmp_path)


def test_resume_under_torchrun(minidata_root, tmp_path):
    args = ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--nf", 4, "--batchSize", 4,
            "--nTest", 2, "--checkpointFreq", 2, "--manualSeed", 6, "--workers", 1, "--device", "cpu", "--silent",
            "--outf", tmp_path / "out"]
    torchrun(os.path.join(ROOT, "train.py"), args + ["--nIteration", 1], cwd=tmp_path)
    torchrun(os.path.join(ROOT, "train.py"), ["--resume", "--nIteration", 3, "--outf", tmp_path / "out"], cwd=tmp_path)
    assert [line.split()[0] for line in (tmp_path / "out" / "val.dat").read_text().splitlines()] == ["2", "4"]
    assert utils.load_options(tmp_path / "out" / "options.pth").iteration == 4


def test_batch_size_must_split_evenly(minidata_root, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), os.path.join(ROOT, "train.py"), "--dataroot", str(minidata_root / "flowers"),
               "--batchSize", "3", "--nf", "4", "--device", "cpu", "--outf", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    assert "--batchSize 3: under torchrun it is the global batch" in result.stderr
