"""Every branch the code takes by device type, exercised on the CPU; the same tests run on a
GPU with REDO_TEST_DEVICE=cuda (tools/gpu_check.py)."""

import os
import subprocess
import sys
import time

import pytest
import torch

import datasets
import models
import monitor
import options
import train
import utils
from conftest import SMALL_RUN, named_tensors, run_process, run_script

TINY_TRAINING = ["--dataset", "synthetic", "--nf", 4, "--batchSize", 2, "--nIteration", 100000, "--workers", 0,
                 "--device", "cpu", "--silent"]


def test_sdpa_attention_gives_the_cpu_kernels_numbers(test_device):
    """The GPU path (torch's scaled_dot_product_attention) and the CPU path (our blocked
    kernel), forward and backward, on the same inputs, at the generator's 32x32 attention."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, d, generator=g).to(test_device).requires_grad_()
               for n, d in ((1024, 4), (256, 4), (256, 8)))
    grad = torch.randn(2, 1024, 8, generator=g).to(test_device)
    outputs = {}
    for sdpa in (True, False):
        out = models.attention(q, k, v, sdpa=sdpa)
        outputs[sdpa] = (out,) + torch.autograd.grad(out, (q, k, v), grad)
    for fused, blocked in zip(outputs[True], outputs[False]):
        torch.testing.assert_close(fused, blocked, rtol=1e-4, atol=1e-5)
    assert models.attention(q, k, v).device == test_device


def test_attention_takes_the_fused_kernel_by_default_on_a_gpu_only(test_device, monkeypatch):
    calls, fused = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(args[0].device) or fused(*args, **kwargs))
    q, k, v = (torch.randn(2, n, 4, device=test_device) for n in (64, 16, 16))
    models.attention(q, k, v)
    assert calls == ([q.device] if test_device.type == "cuda" else [])


class TwoFakeGPUs:
    """torch.cuda's random-state functions for a machine with two GPUs."""

    def __init__(self):
        self.states = [torch.arange(8, dtype=torch.uint8) + i for i in range(2)]

    def is_available(self):
        return True

    def device_count(self):
        return len(self.states)

    def get_rng_state_all(self):
        return [s.clone() for s in self.states]

    def set_rng_state(self, state, index):
        self.states[index] = state.clone()


def test_random_states_of_every_gpu_are_saved_and_restored(tmp_path):
    gpus = TwoFakeGPUs()
    states = utils.rng_states(cuda=gpus)
    torch.save(states, tmp_path / "rng.pth")
    saved = [s.clone() for s in gpus.states]
    gpus.states = [torch.zeros(8, dtype=torch.uint8)] * 2
    loaded = torch.load(tmp_path / "rng.pth")  # weights_only, as checkpoints load
    utils.restore_rng_states(loaded, cuda=gpus)
    assert all(torch.equal(a, b) for a, b in zip(gpus.states, saved))
    one_gpu = TwoFakeGPUs()
    one_gpu.states = one_gpu.states[:1]  # a run saved on 2 GPUs resumed on 1
    utils.restore_rng_states(loaded, cuda=one_gpu)
    assert torch.equal(one_gpu.states[0], saved[0])


def test_real_gpu_random_states_round_trip(test_device):
    if test_device.type != "cuda":
        pytest.skip("needs CUDA (REDO_TEST_DEVICE=cuda)")
    states = utils.rng_states()
    first = torch.rand(3, device=test_device)
    utils.restore_rng_states(states)
    assert torch.equal(torch.rand(3, device=test_device), first)


def test_checkpoints_load_onto_the_target_device(weights_from_cuda):
    """Every tensor of a checkpoint saved from cuda:0, optimizer states included, is mapped
    to the device asked for (here 'meta', a device without memory, which any machine has)."""
    state = utils.load_checkpoint(weights_from_cuda["state_00002.pth"], "meta")
    tensors = [t for key in state if key.startswith(("net", "optimizer")) for _, t in named_tensors(state[key])]
    assert len(tensors) > 100 and all(t.device.type == "meta" for t in tensors)


def test_cudnn_picks_its_fastest_convolutions_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    utils.tune_for_device(torch.device("cuda"))
    assert torch.backends.cudnn.benchmark


def test_a_run_on_the_device_pins_its_batches_and_continues_a_cpu_checkpoint(minidata_root, tmp_path, test_device):
    """Batches in page-locked memory for a GPU (not on the CPU); a checkpoint saved on the
    CPU continues on the device with its nets and Adam states there."""
    outf = tmp_path / "out"
    flags = ["--dataset", "flowers", "--dataroot", str(minidata_root / "flowers"), "--outf", str(outf),
             "--checkpointFreq", "2", "--manualSeed", "3", *SMALL_RUN]
    run_script("train.py", *flags, "--nIteration", 1, cwd=tmp_path)
    on_device = [a if a != "cpu" else str(test_device) for a in flags]
    opt, start = options.resolve_options(options.make_parser().parse_args(on_device + ["--iteration", "2"]))
    run = train.TrainingRun(opt, start)
    assert run.trainloader.pin_memory == run.genData.loader.pin_memory == (test_device.type == "cuda")
    if test_device.type == "cuda":
        assert next(iter(run.trainloader))[0].is_pinned()
    run.train_one_iteration()
    for optimizer in run.optimizers.values():
        for param, param_state in optimizer.state.items():
            assert param.device.type == param_state["exp_avg"].device.type == test_device.type
    assert all(t.device.type == test_device.type for _, net in run.nets.items() for t in net.state_dict().values())


def test_peak_memory_is_the_devices(test_device):
    peak = monitor.peak_memory_mb(test_device)
    assert peak is not None and peak > 0
    if test_device.type == "cuda":
        assert peak == torch.cuda.max_memory_allocated(test_device) / 2**20


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_says_in_one_line_that_there_is_no_cuda(tmp_path):
    result = run_process("tools/gpu_check.py", "--out", tmp_path / "report", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("gpu_check: CUDA is not available on this machine")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "report").exists()


def test_gpu_check_fails_a_step_that_fails_in_part(tmp_path):
    """A crashed command, and a training that reaches no checkpoint, each fail their step."""
    import gpu_check
    steps = {"crash": [sys.executable, "-c", "import sys; sys.exit(3)"],
             "training": [sys.executable, "tools/learning_curve.py", "--minutes", 0.05, "--outf", tmp_path / "run", "--",
                          *TINY_TRAINING, "--checkpointFreq", 100000]}
    for name, command in steps.items():
        status, _, tail = gpu_check.run_step(name, [str(c) for c in command], 120, str(tmp_path))
        assert status.startswith("failed (exit status"), (name, status, tail)
    assert tail[-1] == "train.py reached no checkpoint in 0.05 minutes"


def test_benchmark_profile_gives_every_part_of_an_iteration_its_time(monkeypatch):
    """--profile on tiny nets: the convolutions' forward and backward, spectral norm, the
    optimizers and the data are found as parts of their own, and the parts add up to the
    profiled iteration (what no operator covers being Python and the framework)."""
    import benchmark
    monkeypatch.setattr(datasets.SyntheticDataset, "SIZES", {"train": 8, "val": 4, "test": 4})
    monkeypatch.setitem(benchmark.PROFILED, "tiny", ["--dataset", "synthetic", "--nf", 4, "--batchSize", 2,
                                                     "--nTest", 2, "--workers", 0])
    parts, seconds, profiled_seconds, flops = benchmark.profile_iterations("tiny", 2, 1)
    for part in ("convolutions, forward", "convolutions, backward", "spectral norm", "optimizers", "data"):
        assert parts[part] > 0, part
    assert parts["Python and framework between operators"] > 0
    assert sum(parts.values()) == pytest.approx(profiled_seconds)
    assert seconds > 0 and flops > 0


def test_benchmark_fails_when_a_measurement_fails(monkeypatch, capsys):
    """A measurement's process that crashed is a 'failed:' row, and the benchmark's exit status says so."""
    import benchmark
    monkeypatch.setattr(benchmark, "run_child", lambda config, mode, impl, args: {"error": "RuntimeError: crashed"})
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--configs", "small", "--modes", "fp32,bf16", "--skip-data",
                                      "--device", "cpu"])
    with pytest.raises(SystemExit, match="benchmark: 2 measurements failed: small ours fp32, small ours bf16"):
        benchmark.main()
    assert "| ours | fp32 | failed: RuntimeError: crashed |" in capsys.readouterr().out


def test_gpu_check_ends_every_process_of_a_step_out_of_time(tmp_path):
    """learning_curve.py starts train.py in a process group of its own: a step out of time
    leaves neither running."""
    import gpu_check
    outf = tmp_path / "run"
    command = [sys.executable, "tools/learning_curve.py", "--minutes", 5, "--outf", outf, "--", *TINY_TRAINING]
    status, _, tail = gpu_check.run_step("training", [str(c) for c in command], 5, str(tmp_path))
    assert status == "ran out of its 5 s", tail
    time.sleep(1)
    assert not processes_naming(str(outf)), tail


def processes_naming(text):
    """The pids of this machine's processes whose command line holds text."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except OSError:  # ended meanwhile
            pass
    return pids


def test_benchmark_side_by_side_times_each_revision_after_its_first_period(tmp_path):
    """--side-by-side: a revision's tree is the commit's files, and the speeds leave out the
    first checkpoint period (start-up, compilation) but count the scoring of the others."""
    import benchmark
    records = [{"step": 100, "seconds": 70.0, "period_seconds": 50.0},
               {"step": 200, "seconds": 120.0, "period_seconds": 45.0},
               {"step": 300, "seconds": 180.0, "period_seconds": 55.0}]
    training, with_scoring = benchmark.speeds_after_the_first_period(records)
    assert training == pytest.approx(200 / 100) and with_scoring == pytest.approx(110 / 200)
    with pytest.raises(SystemExit, match="two checkpoint periods"):
        benchmark.speeds_after_the_first_period(records[:1])
    tree = benchmark.source_tree("HEAD", str(tmp_path / "tree"))
    committed = subprocess.run(["git", "show", "HEAD:train.py"], cwd=benchmark.ROOT, capture_output=True,
                               check=True).stdout
    with open(os.path.join(tree, "train.py"), "rb") as f:
        assert f.read() == committed
    assert benchmark.source_tree(".", str(tmp_path / "here")) == benchmark.ROOT
