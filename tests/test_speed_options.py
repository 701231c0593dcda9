"""The speed options keep the numbers: cache-blocked attention, fused convolutions, --amp bf16,
--cacheData, --compile, --nTrainScore; and freed memory is reused on the CPU."""
import os
import platform
import subprocess
import sys

import pytest
import torch

import datasets
import models
import options
import scores
import train
import utils
from conftest import ROOT, SMALL_RUN, assert_same_checkpoint, is_free_bias, read_dat, run_script


# The blocked attention against the exact values (float64), as close as the plain formula in
# float32 is. Largest gaps measured on a 2-core Intel Xeon (AVX-512), at 1 and 2 threads, with its
# own kernels and with AVX2's (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
# MKL_ENABLE_INSTRUCTIONS=AVX2): output 1.3e-6 (the plain formula's too), gradients 8.1e-6 (the plain
# formula's: 1.3e-5, which is why the float32 formula is not the reference). Bounds: twice that.
ATTENTION_OUTPUT_GAP, ATTENTION_GRADIENT_GAP = 2.7e-6, 1.6e-5


@pytest.mark.parametrize("n_queries", [1024, 1100])  # a whole number of blocks, and not
def test_chunked_attention_is_as_close_to_the_exact_values_as_the_plain_formula(n_queries):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, d, generator=g, requires_grad=True) for n, d in ((n_queries, 4), (300, 4), (300, 6)))
    grad = torch.randn(2, n_queries, 6, generator=g)
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = torch.softmax(exact_inputs[0] @ exact_inputs[1].transpose(1, 2), dim=-1) @ exact_inputs[2]
    exact_grads = torch.autograd.grad(exact, exact_inputs, grad.double())
    expected = exact.detach().float()
    chunked = models._ChunkedAttention.apply(q, k, v)
    torch.testing.assert_close(chunked, expected, rtol=0, atol=ATTENTION_OUTPUT_GAP)
    # inputs without gradient (as the discriminator step's redrawing): the matrix is not kept
    torch.testing.assert_close(models._ChunkedAttention.apply(q.detach(), k.detach(), v.detach()), expected,
                               rtol=0, atol=ATTENTION_OUTPUT_GAP)
    for got, want in zip(torch.autograd.grad(chunked, (q, k, v), grad), exact_grads):
        torch.testing.assert_close(got, want.float(), rtol=0, atol=ATTENTION_GRADIENT_GAP)


def test_split_mask_convolution_and_upsampled_shortcut_equal_the_original_layers():
    torch.manual_seed(0)
    conv = models.SNConv2d(9, 5, 3, 1, 1)
    x, m = torch.randn(2, 8, 16, 16), torch.rand(2, 1, 16, 16)
    for _ in range(10):  # power iterations: sigma near the weight's norm, outputs of order 1
        conv(torch.cat((x, m), 1))
    conv.eval()
    torch.testing.assert_close(conv.forward_concat(x, m), conv(torch.cat((x, m), 1)), rtol=1e-5, atol=1e-5)
    shortcut = models.UpsampledConv1x1(torch.nn.Upsample(scale_factor=2), models.SNConv2d(8, 4, 1)).eval()
    assert torch.equal(shortcut(x), shortcut[1](shortcut[0](x)))


def test_fused_convolutions_equal_the_original_layers_in_value_and_gradient():
    """Exact math: compared in float64, where only rounding could tell them apart."""
    torch.manual_seed(0)
    x, m = torch.randn(2, 8, 8, 8, dtype=torch.float64), torch.rand(2, 1, 8, 8, dtype=torch.float64)
    upsample = torch.nn.Upsample(scale_factor=2)
    pooled = models.ConvThenAvgPool(torch.nn.ReLU(), models.SNConv2d(8, 5, 3, 1, 1), torch.nn.AvgPool2d(2)).double()
    upsampled = models.SNConv2d(9, 5, 3, 1, 1, bias=False).double()
    up_conv = models._upConv(nOut=2, nf=8).double()
    cases = [(up_conv, lambda: up_conv(x), lambda: up_conv.mods(x)),
             (pooled, lambda: pooled(x), lambda: torch.nn.Sequential.forward(pooled, x)),
             (upsampled, lambda: upsampled.forward_upsampled(x, m),
              lambda: upsampled(upsample(torch.cat((x, m), 1))))]
    for module, fused, original in cases:
        module.eval()  # no power iteration: both calls see the same normalised weight
        got, want = fused(), original()
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(want)
        for g_got, g_want in zip(torch.autograd.grad(got, list(module.parameters()), grad),
                                 torch.autograd.grad(original(), list(module.parameters()), grad)):
            torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


def small_options():
    return options.options_for("--nz", 8, "--nResM", 1, "--nf", 4, "--useSelfAttD", "--useSelfAttG", "--device", "cpu",
                            "--manualSeed", 1)


def losses_of_iterations(precision, compile_backend=None, iterations=3, device=torch.device("cpu")):
    opt = small_options()
    torch.manual_seed(0)
    nets = models.build_nets(opt, device)
    if compile_backend:
        models.compile_nets(nets, compile_backend)
    optimizers = train.make_optimizers(nets, opt)
    g = torch.Generator().manual_seed(1)
    history = []
    for i in range(iterations):
        x, xr = (torch.rand(2, 3, 128, 128, generator=g).to(device) * 2 - 1 for _ in range(2))
        z = torch.randn(2, 2, opt.nz, 1, 1, generator=g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses = train.training_iteration(nets, optimizers, x, xr, z, opt, i)
        history.append({k: v.item() for k, v in losses.items()})
    return history, nets


def test_bf16_iterations_stay_close_to_fp32(threads):
    fp32, nets32 = losses_of_iterations("fp32")
    bf16, nets16 = losses_of_iterations("bf16")
    for a, b in zip(fp32, bf16):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=0.03, abs=0.05), key
    # The weights stay fp32 and bf16's three updates point where fp32's do: the gap between
    # the two updates relative to fp32's (about 1.4 for unrelated updates). Measured with 1
    # and 2 threads on an AMD EPYC (AVX2) and an Intel Xeon (AVX-512, KVM): 0.26 (netEncM),
    # 0.39 (netGenX, its free biases aside), 0.048 (netDX), 0.041 (netRecZ). Bounds: twice that.
    torch.manual_seed(0)
    initial = models.build_nets(small_options())
    bounds = {"netEncM": 0.53, "netGenX": 0.8, "netDX": 0.1, "netRecZ": 0.1}
    for (name, n32), (_, n16), (_, n0) in zip(nets32.items(), nets16.items(), initial.items()):
        assert all(t.dtype == torch.float32 for t in n16.parameters()), name
        keys = [k for k, _ in n0.named_parameters() if not (name == "netGenX" and is_free_bias(k, selfAttG=True))]
        p32, p16, p0 = (dict(net.named_parameters()) for net in (n32, n16, n0))
        update32 = torch.cat([(p32[k] - p0[k]).flatten() for k in keys])
        update16 = torch.cat([(p16[k] - p0[k]).flatten() for k in keys])
        assert (update16 - update32).norm() <= bounds[name] * update32.norm(), name


@pytest.mark.parametrize("calls", [1, 2])
def test_compiled_spectral_norm_has_the_eager_gradient(calls):
    """Called once, or twice before the backward as the discriminator on real then fake
    images. With 4 output channels, torch 2.14's compiled backward recomputes v from the
    buffer u rather than keeping v: with u updated in place, one call gave a wrong gradient
    and two calls an error (README, --compile). The partition where that happens runs
    without generating code (aot_eager_decomp_partition: no C++ compiler needed)."""
    torch.manual_seed(0)
    eager = models.SNConv2d(3, 4, 3, 1, 1)
    compiled = models.SNConv2d(3, 4, 3, 1, 1)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(backend="aot_eager_decomp_partition")
    x = torch.randn(2, 3, 8, 8)
    for conv in (eager, compiled):
        sum(conv(x * (i + 1)).square().sum() for i in range(calls)).backward()
    # measured beyond rtol: 7.2e-5 at most (2 calls, an AVX2 Zen 3 EPYC), 2.8e-5 on an AVX-512 Xeon;
    # a wrong gradient is off by its own size
    torch.testing.assert_close(compiled.weight_orig.grad, eager.weight_orig.grad, rtol=1e-4, atol=1.5e-4)
    torch.testing.assert_close(compiled.weight_u, eager.weight_u)
    torch.testing.assert_close(compiled.weight_v, eager.weight_v)


@pytest.mark.skipif(not os.environ.get("REDO_SLOW_TESTS"), reason="compiles for minutes; set REDO_SLOW_TESTS=1")
@pytest.mark.parametrize("backend", [
    # graph capture and the forward/backward partition, where the bug above was, without
    # generating code (it fails on the old in-place buffer update; the spectral-norm test above
    # checks that bug in seconds)
    "aot_eager_decomp_partition",
    # what --compile uses (tools/gpu_check.py runs it on the GPU)
    "inductor"])
def test_compiled_iterations_stay_close_to_eager(backend, test_device):
    eager, _ = losses_of_iterations("fp32", device=test_device)
    compiled, _ = losses_of_iterations("fp32", compile_backend=backend, device=test_device)
    for a, b in zip(eager, compiled):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-3), key


def test_cached_data_gives_the_same_run(minidata_root, tmp_path):
    """One checkpoint, after 4 iterations: each stream's 8 images go past the end of the 6
    training images."""
    args = ["--dataset", "cub", "--dataroot", minidata_root / "cub", "--nIteration", 4, "--checkpointFreq", 4,
            "--manualSeed", 2, *SMALL_RUN, "--workers", 1]
    run_script("train.py", *args, "--outf", tmp_path / "disk", cwd=tmp_path)
    run_script("train.py", *args, "--outf", tmp_path / "cached", "--cacheData", cwd=tmp_path)
    disk = utils.load_checkpoint(tmp_path / "disk" / "state_00004.pth")
    cached = utils.load_checkpoint(tmp_path / "cached" / "state_00004.pth")
    for name in ("netEncM", "netGenX", "netDX", "netRecZ"):
        for key in disk[name]:
            assert torch.equal(disk[name][key], cached[name][key]), (name, key)
    assert (tmp_path / "disk" / "val.dat").read_text() == (tmp_path / "cached" / "val.dat").read_text()


def test_nTrainScore_scores_the_first_training_images_and_trains_the_same(minidata_root, tmp_path):
    """--nTrainScore 2 (one batch): train.dat holds the scores of the first 2 of the 6 training
    images; the run draws the same random numbers, so its weights are those of a run that scores
    the whole split."""
    args = ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--nIteration", 3,
            "--checkpointFreq", 2, "--manualSeed", 2, *SMALL_RUN]
    run_script("train.py", *args, "--outf", tmp_path / "whole", cwd=tmp_path)
    run_script("train.py", *args, "--outf", tmp_path / "first", "--nTrainScore", 2, cwd=tmp_path)
    whole = utils.load_checkpoint(tmp_path / "whole" / "state_00004.pth")
    first = utils.load_checkpoint(tmp_path / "first" / "state_00004.pth")
    for name in ("netEncM", "netGenX", "netDX", "netRecZ"):
        for key in whole[name]:
            assert torch.equal(whole[name][key], first[name][key]), (name, key)
    trainset = datasets.make_dataset("flowers", minidata_root / "flowers", "train")
    first_two = torch.utils.data.DataLoader(torch.utils.data.Subset(trainset, range(2)), batch_size=2)
    for iteration, acc, iou in read_dat(tmp_path / "first" / "train.dat"):
        state = utils.load_checkpoint(tmp_path / "first" / ("state_%05d.pth" % iteration))
        expected = scores.evaluate(utils.load_nets(state, ["netEncM"]).netEncM, first_two, "cpu")
        assert (acc, iou) == pytest.approx((expected.acc, expected.iou), abs=1e-6)
    assert read_dat(tmp_path / "first" / "train.dat") != read_dat(tmp_path / "whole" / "train.dat")


def spy_on_iterations(monkeypatch):
    """Record, for each training iteration train.py runs, the dtype in which netGenX drew
    its regions and netDX scored, and whether its nets were compiled."""
    seen = []
    iterate = train.training_iteration

    def spied(nets, *args, **kwargs):
        dtypes = {}

        def record(name):
            def hook(module, inputs, output):
                dtypes.setdefault(name, output.dtype)
            return hook

        hooks = [getattr(nets, name).register_forward_hook(record(name)) for name in ("netGenX", "netDX")]
        try:
            losses = iterate(nets, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        seen.append({"dtypes": dtypes, "compiled": [net._compiled_call_impl is not None for _, net in nets.items()]})
        return losses

    monkeypatch.setattr(train, "training_iteration", spied)
    return seen


AMX_CPU = {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}  # flags of an Intel Xeon with AMX
AVX512_BF16_CPU = {"avx2", "avx512f", "avx512_bf16"}  # of an AMD EPYC (Zen 4 and 5)
AVX2_CPU = {"avx2", "fma"}


@pytest.mark.parametrize("flags, units", [(AMX_CPU, "AMX"), (AVX512_BF16_CPU, "AVX512-BF16"), (AVX2_CPU, None),
                                          (set(), None)])
def test_native_bfloat16_is_read_from_the_cpu_flags(flags, units, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: %s\n\nprocessor\t: 1\n" % " ".join(sorted(flags)))
    assert utils.cpu_flags(str(cpuinfo)) == flags
    assert utils.native_bfloat16(flags) == units
    assert utils.cpu_flags(str(tmp_path / "absent")) == set()


@pytest.mark.parametrize("amp, flags, dtype, line, warned", [
    ("none", AMX_CPU, torch.float32, None, False),  # the default, and an explicit --amp wins
    ("bf16", AMX_CPU, torch.bfloat16, "Training in bf16 autocast (--amp bf16: this CPU has AMX)", False),
    ("bf16", AVX2_CPU, torch.bfloat16, "Training in bf16 autocast (--amp bf16)", True),
    ("auto", AMX_CPU, torch.bfloat16, "Training in bf16 autocast (--amp auto: this CPU has AMX)", False),
    ("auto", AVX512_BF16_CPU, torch.bfloat16, "Training in bf16 autocast (--amp auto: this CPU has AVX512-BF16)",
     False),
    ("auto", AVX2_CPU, torch.float32,
     "Training in fp32 (--amp auto: this CPU has no native bfloat16, AMX or AVX512-BF16)", False)])
def test_amp_trains_in_the_precision_chosen_for_the_cpu_says_so_and_saves_fp32(amp, flags, dtype, line, warned,
                                                                               minidata_root, tmp_path, monkeypatch):
    """--amp auto: bf16 where the CPU's flags name native bfloat16 units, fp32 elsewhere, said in
    the run's first lines; --amp bf16 on a CPU without them warns once; checkpoints stay fp32."""
    monkeypatch.setattr(utils, "cpu_flags", lambda: flags)
    seen = spy_on_iterations(monkeypatch)
    result = run_script("train.py", "--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--outf",
                        tmp_path, "--nIteration", 1, "--checkpointFreq", 2, "--amp", amp,
                        *[a for a in SMALL_RUN if a != "--silent"], cwd=tmp_path)
    assert [s["dtypes"] for s in seen] == [{"netGenX": dtype, "netDX": dtype}] * 2
    lines = result.stdout.splitlines()
    assert lines[1] == line if line else not any(text.startswith("Training in") for text in lines)
    assert result.stderr.count("warning: --amp bf16: this CPU has no native bfloat16") == warned
    state = utils.load_checkpoint(tmp_path / "state_00002.pth")
    assert state["options"].amp == amp
    assert all(t.dtype == torch.float32 for name in ("netEncM", "netGenX", "netDX", "netRecZ")
               for t in state[name].values())


def test_a_bf16_run_resumes_bit_for_bit(minidata_root, tmp_path):
    command = ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--checkpointFreq", 2,
               "--manualSeed", 4, "--amp", "bf16", *SMALL_RUN]
    run_script("train.py", *command, "--nIteration", 4, "--outf", tmp_path / "whole", cwd=tmp_path)
    run_script("train.py", *command, "--nIteration", 2, "--outf", tmp_path / "stopped", cwd=tmp_path)
    run_script("train.py", "--resume", "--nIteration", 4, "--outf", tmp_path / "stopped", cwd=tmp_path)
    assert_same_checkpoint(utils.load_checkpoint(tmp_path / "stopped" / "state_00004.pth"),
                           utils.load_checkpoint(tmp_path / "whole" / "state_00004.pth"))


def test_compile_flag_compiles_the_nets_and_saves_plain_checkpoints(minidata_root, tmp_path, monkeypatch):
    """train.py --compile, with torch.compile's graph capture but no code generation (the
    'eager' backend): every net compiled, the run as the uncompiled one, the original's keys."""
    monkeypatch.setattr(models, "COMPILE_BACKEND", "eager")
    seen = spy_on_iterations(monkeypatch)
    args = ["--dataset", "flowers", "--dataroot", minidata_root / "flowers", "--nIteration", 1,
            "--checkpointFreq", 2, "--manualSeed", 3, *SMALL_RUN]
    run_script("train.py", *args, "--outf", tmp_path / "compiled", "--compile", cwd=tmp_path)
    assert [s["compiled"] for s in seen] == [[True] * 4] * 2
    run_script("train.py", *args, "--outf", tmp_path / "eager", cwd=tmp_path)
    assert [s["compiled"] for s in seen[2:]] == [[False] * 4] * 2
    compiled = utils.load_checkpoint(tmp_path / "compiled" / "state_00002.pth")
    eager = utils.load_checkpoint(tmp_path / "eager" / "state_00002.pth")
    assert compiled["options"].compile
    for name in ("netEncM", "netGenX", "netDX", "netRecZ"):
        assert list(compiled[name]) == list(eager[name]), name  # no _orig_mod. prefix
        for key in eager[name]:
            torch.testing.assert_close(compiled[name][key], eager[name][key], rtol=0, atol=1e-6)


PAGE_FAULTS_OF_ITERATIONS = """
import resource, sys, torch
if sys.argv[1] == "tuned":  # (utils is imported only here: its import costs the other child a second)
    sys.path.insert(0, %r)
    import utils
    utils.tune_for_device(torch.device("cpu"))

def iteration():  # like a training iteration: large activations alive together, then all freed
    activations = [torch.ones(2 ** 24 * (1 + i %% 3)) for i in range(6)]  # 64 to 192 MB each
    return sum(a[0].item() for a in activations)

iteration()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    iteration()
with open("/proc/self/maps") as f:  # an allocator that replaces glibc's malloc (LD_PRELOAD)
    others = sorted({name for name in ("jemalloc", "tcmalloc", "mimalloc") if name in f.read()})
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, " ".join(others))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="utils.keep_freed_memory tunes glibc's malloc")
def test_training_on_the_cpu_reuses_freed_memory_instead_of_faulting_it_in_again():
    script = PAGE_FAULTS_OF_ITERATIONS % ROOT
    faults = {}
    for mode in ("default", "tuned"):
        count, *allocators = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                            check=True, timeout=300).stdout.split()
        if allocators:
            pytest.skip("malloc is %s's here, not glibc's, which utils.keep_freed_memory tunes" % allocators[0])
        faults[mode] = int(count)
    if faults["default"] <= 1000:
        pytest.skip("glibc's malloc already reuses freed memory here (%d page faults untuned): nothing to save"
                    % faults["default"])
    assert faults["tuned"] < faults["default"] / 4, faults
