"""Speed benchmark: seconds per training iteration, images per
second and peak memory for each speed option, the data loader's images per second, and
the share of evaluation at checkpoints.

    python tools/benchmark.py                                   # small and paper configurations
    python tools/benchmark.py --original ../ReDO                # also the original, for ratios
    python tools/benchmark.py --configs small --modes fp32,bf16 --iterations 5
    python tools/benchmark.py --original ../ReDO --modes fp32 --rounds 3  # medians of 3 rounds
    python tools/benchmark.py --logging out/stats.jsonl   # cost of stats.jsonl, curves.png, the label-free score
    python tools/benchmark.py --flops paper                # floating-point operations of one iteration
    python tools/benchmark.py --data                       # the data loader alone
    python tools/benchmark.py --profile quickstart --iterations 20   # where an iteration's time goes (CPU)
    python tools/benchmark.py --profile paper --iterations 2 --warmup 2
    python tools/benchmark.py --side-by-side HEAD~1 HEAD --iterations 300 --rounds 3   # the quickstart, two commits
    python tools/benchmark.py --side-by-side HEAD "HEAD --compile" --iterations 300     # ... or two sets of flags

--original points at a checkout of github mickaelChen/ReDO: its models.py is timed with
its train.py's loop body, transcribed here step for step (original_iteration).
Every measurement runs in a fresh process, so peak memory is its own.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import options  # noqa: E402
import utils  # noqa: E402

CONFIGS = {
    "small": dict(nf=16, nfX=16, batchSize=4),
    "paper": dict(nf=64, nfX=32, batchSize=20),  # the README's Flowers command, default batch size
}


def config_options(config):
    """train.py's options for a configuration, through its parser."""
    c = CONFIGS[config]
    return options.options_for("--nf", c["nf"], "--nfX", c["nfX"], "--batchSize", c["batchSize"], "--useSelfAttD",
                               "--useSelfAttG", "--device", "cpu", "--manualSeed", 1)


def original_nets(path, opt, device):
    import models
    spec = importlib.util.spec_from_file_location("original_models", os.path.join(path, "models.py"))
    original = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(original)
    return models.ReDONets(
        netEncM=original._netEncM(sizex=128, nIn=3, nMasks=2, nRes=opt.nResM, nf=opt.nfM),
        netGenX=original._netGenX(sizex=128, nOut=3, nc=opt.nz, nf=opt.nfX, nMasks=2, selfAtt=True),
        netDX=original._resDiscriminator128(nIn=3, nf=opt.nfD, selfAtt=True),
        netRecZ=original._netRecZ(sizex=128, nIn=3, nc=opt.nz, nf=opt.nfZ, nMasks=2)).to(device)


def original_iteration(nets, optimizers, xData, xReal, zData, opt):
    """The original train.py's loop body, step for step (our transcription, run on the
    original's networks): the discriminator's parameter gradients are computed in the
    generator step and zeroed before its own step, and the hinge loss is built from masks."""
    import models
    nets.zero_grad()
    nets.train()
    hGen, xGen = models.redraw(nets.netGenX, xData, nets.netEncM(xData), zData)  # the original's composite
    lossG = -nets.netDX(xGen.flatten(0, 1)).mean()
    zRec = nets.netRecZ(hGen.sum(1))
    lossG = lossG + ((zData - zRec) * (zData - zRec)).mean() * opt.wrecZ
    lossG.backward()
    for name in ("optimizerEncM", "optimizerGenX", "optimizerRecZ"):
        optimizers[name].step()
    nets.netDX.zero_grad()
    with torch.no_grad():
        _, xGen = models.redraw(nets.netGenX, xData, nets.netEncM(xData), zData)
    errReal = -1 + nets.netDX(xReal)
    errFake = -1 - nets.netDX(xGen.flatten(0, 1))
    errReal = ((errReal < 0).float() * errReal).mean()
    errFake = ((errFake < 0).float() * errFake).mean()
    (-errReal - errFake).backward()
    optimizers["optimizerDX"].step()


def measure_iterations(config, mode, impl, iterations, device):
    """Runs in a child process: time training iterations, return a dict of figures."""
    import models
    import monitor
    import train
    opt = config_options(config)
    torch.manual_seed(0)
    if impl == "ours":
        utils.tune_for_device(torch.device(device))  # as train.py does
    nets = original_nets(impl, opt, device) if impl != "ours" else models.build_nets(opt, device)
    if mode == "compile":
        models.compile_nets(nets)
    optimizers = train.make_optimizers(nets, opt, fused=impl == "ours")  # the original's Adam is unfused
    B = opt.batchSize
    x, xr = torch.rand(B, 3, 128, 128, device=device) * 2 - 1, torch.rand(B, 3, 128, 128, device=device) * 2 - 1
    z = models.draw_noise(B, 2, opt.nz, device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mode == "bf16")
    times = []
    warmup = 2 if mode == "compile" else 1
    for i in range(warmup + iterations):
        sync(device)
        start = time.perf_counter()
        with autocast:
            if impl == "ours":
                train.training_iteration(nets, optimizers, x, xr, z, opt, i)
            else:
                original_iteration(nets, optimizers, x, xr, z, opt)
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[warmup:])
    return {"seconds": seconds, "images_per_second": B / seconds, "peak_mb": monitor.peak_memory_mb(torch.device(device)),
            "first_seconds": times[0]}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_data(workers_list, n_images=96):
    """Images per second of the training loader on a Flowers-shaped set of 500x667 JPEGs,
    decoded from disk at each epoch, and from the in-memory cache (--cacheData)."""
    import minidata
    import datasets
    results = {}
    with tempfile.TemporaryDirectory() as root:
        minidata.make_flowers(root, n_train=n_images, n_val=2, n_test=2, size=(667, 500))
        dataset = datasets.make_dataset("flowers", root, "train")
        start = time.perf_counter()
        cached = datasets.InMemoryDataset(dataset, max(workers_list))
        results["filling the cache (%d workers)" % max(workers_list)] = len(dataset) / (time.perf_counter() - start)
        for workers in workers_list:
            for name, data in (("from JPEG files", dataset), ("from the cache (--cacheData)", cached)):
                loader = datasets.make_loader(data, 20, workers)
                loader_speed(loader)  # the workers' start-up and a first epoch
                results["%s, %d workers" % (name, workers)] = loader_speed(loader)
    return results


def loader_speed(loader):
    start = time.perf_counter()
    n = sum(x.size(0) for x, _ in loader)
    return n / (time.perf_counter() - start)


def measure_evaluation(config, device):
    """Seconds to score one image with evaluate(), and the share of a checkpoint period
    (500 iterations, Flowers' 6149 + 1020 images scored) that evaluation takes."""
    import models
    import scores
    opt = config_options(config)
    netEncM = models.build_nets(opt, device).netEncM
    batches = [(torch.rand(opt.batchSize, 3, 128, 128) * 2 - 1, torch.ones(opt.batchSize, 1, 128, 128))] * 5
    start = time.perf_counter()
    scores.evaluate(netEncM, batches, device)
    return (time.perf_counter() - start) / (5 * opt.batchSize)


def measure_logging(stats_path, tensorboard=False):
    """Replay a run's stats.jsonl: the seconds that writing each record and redrawing
    curves.png (and TensorBoard) took, against the period the record describes."""
    import monitor
    records, _ = monitor.read_stats(stats_path)
    if not records:
        sys.exit("%s: no records" % stats_path)
    shares = []
    with tempfile.TemporaryDirectory() as folder:
        writer = monitor.tensorboard_writer(folder) if tensorboard else None
        for k, record in enumerate(records, 1):
            start = time.perf_counter()
            utils.append_line(os.path.join(folder, monitor.STATS_FILE), json.dumps(record))
            monitor.plot_curves(records[:k], os.path.join(folder, "curves.png"), 0.05)
            if writer is not None:
                for name, value in monitor.flat_scalars(record).items():
                    writer.add_scalar(name, value, record["step"])
                writer.flush()
            seconds = time.perf_counter() - start
            shares.append((seconds, seconds / (record["period_seconds"] + record["score_seconds"])))
    return shares


def label_free_costs(stats_path):
    """The label-free score's seconds at each checkpoint of a run, against its period."""
    import monitor
    records, _ = monitor.read_stats(stats_path)
    return [r["label_free_seconds"] / (r["period_seconds"] + r["score_seconds"]) for r in records]


def measure_flops(config):
    """Floating-point operations of one training iteration (forward and backward of every
    step), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    import models
    import train
    opt = config_options(config)
    nets = models.build_nets(opt)
    optimizers = train.make_optimizers(nets, opt, fused=False)
    x = torch.rand(opt.batchSize, 3, 128, 128) * 2 - 1
    z = models.draw_noise(opt.batchSize, opt.nMasks, opt.nz)
    with FlopCounterMode(display=False) as counter:
        train.training_iteration(nets, optimizers, x, x, z, opt, 0)
    return counter.get_total_flops()


# README's quickstart command (--preset cpu, spelled out so that older revisions run it too), but its --outf
QUICKSTART = ["--dataset", "synthetic"] + options.preset_flags("cpu", "synthetic")
PROFILED = {  # train.py's flags of the configurations --profile knows, on the built-in dataset
    "quickstart": QUICKSTART,
    "paper": ["--dataset", "synthetic", "--nf", 64, "--nfX", 32, "--useSelfAttG", "--useSelfAttD", "--batchSize", 20,
              "--cacheData", "--workers", 0],
}
OTHER_OPS = "other operators (activations, pooling, element-wise, losses)"


def labelled(function, label):
    """function, its calls marked `label` in the profile."""
    from torch.profiler import record_function

    def marked(*args, **kwargs):
        with record_function(label):
            return function(*args, **kwargs)
    return marked


@contextlib.contextmanager
def labelled_in_models():
    """Spectral norm and attention marked in the profile while the block runs."""
    import models
    normalized_weight, attention = models.SNConv2d.normalized_weight, models.attention
    models.SNConv2d.normalized_weight = labelled(normalized_weight, "spectral norm")
    models.attention = labelled(attention, "attention")
    try:
        yield
    finally:
        models.SNConv2d.normalized_weight, models.attention = normalized_weight, attention


class LabelledStream:
    """A batch stream whose batches are marked `label` in the profile as they are fetched."""

    def __init__(self, stream, label):
        self.stream, self.fetch = stream, labelled(lambda: next(stream), label)

    def __next__(self):
        return self.fetch()


def category(name):
    """The part of an iteration a top-level profiler event belongs to."""
    if name.startswith("autograd::engine::evaluate_function: "):
        node = name.split(": ", 1)[1]
        for part, label in (("Convolution", "convolutions, backward"), ("Norm", "normalisation, backward"),
                            ("Mv", "spectral norm"), ("Dot", "spectral norm"), ("Attention", "attention")):
            if part in node:
                return label
        return OTHER_OPS + ", backward"
    if name in ("spectral norm", "attention", "data"):
        return name
    if name.startswith("Optimizer."):
        return "optimizers"
    if name in ("aten::conv2d", "aten::convolution", "aten::_convolution", "aten::conv_transpose2d"):
        return "convolutions, forward"
    if "norm" in name:
        return "normalisation, forward"
    return OTHER_OPS


def profile_iterations(config, iterations, warmup, train_flags=()):
    """Where the time of train.py's own training iterations goes at a configuration (on the
    CPU): {part: seconds per iteration} (profiled), seconds per iteration (not profiled, then
    profiled) and operations per iteration. Top-level events of the main thread, each whole to
    its part; what no event covers is Python and the framework between operators. `iterations`
    should be even (--dStepFreq 2)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode
    import train
    with tempfile.TemporaryDirectory() as outf, labelled_in_models():
        opt = options.options_for(*PROFILED[config], *train_flags, "--device", "cpu", "--manualSeed", 1, "--silent",
                                  "--outf", outf)
        run = train.TrainingRun(opt)
        for stream in ("genData", "disData"):
            setattr(run, stream, LabelledStream(getattr(run, stream), "data"))
        for _ in range(warmup):
            run.train_one_iteration()
        start = time.perf_counter()
        for _ in range(iterations):
            run.train_one_iteration()
        seconds = (time.perf_counter() - start) / iterations
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iterations):
                run.train_one_iteration()
        profiled_seconds = (time.perf_counter() - start) / iterations
        with FlopCounterMode(display=False) as counter:
            for _ in range(2):  # with --dStepFreq 2, one iteration in two has a discriminator step
                run.train_one_iteration()
    events = prof.events()
    main_thread = min(event.thread for event in events)
    parts = {}
    for event in events:
        if event.thread == main_thread and event.cpu_parent is None:
            part = category(event.name)
            parts[part] = parts.get(part, 0.0) + event.cpu_time_total / 1e6 / iterations
    parts["Python and framework between operators"] = profiled_seconds - sum(parts.values())
    return parts, seconds, profiled_seconds, counter.get_total_flops() / 2


def cpu_peak_gflops(fma_units):
    """fp32 peak of this CPU: cores x vector lanes x FMA units x 2 x clock, and how each was
    obtained (lanes from the instruction sets in /proc/cpuinfo, clock as it reports it)."""
    with open("/proc/cpuinfo") as f:
        info = f.read()
    lanes = 16 if " avx512f" in info else 8 if " avx2" in info else 4
    mhz = float(re.search(r"cpu MHz\s*:\s*([0-9.]+)", info).group(1))
    cores = torch.get_num_threads()
    peak = cores * lanes * fma_units * 2 * mhz / 1000
    return peak, "%d threads x %d fp32 lanes (%s) x %d FMA units x 2 x %.2f GHz" % (
        cores, lanes, "AVX-512" if lanes == 16 else "AVX2" if lanes == 8 else "SSE", fma_units, mhz / 1000)


def print_profile(config, iterations, warmup, fma_units, train_flags=()):
    parts, seconds, profiled_seconds, flops = profile_iterations(config, iterations, warmup, train_flags)
    peak, how = cpu_peak_gflops(fma_units)
    print("%s%s: %.3f s per iteration (mean of %d after %d; %.3f s profiled), %.2f GFLOP per iteration: %.1f GFLOP/s, "
          "%.1f%% of the fp32 peak %.0f GFLOP/s (%s)" % (
              config, " " + " ".join(train_flags) if train_flags else "", seconds, iterations, warmup,
              profiled_seconds, flops / 1e9, flops / 1e9 / seconds, 100 * flops / 1e9 / seconds / peak, peak, how))
    bfloat16 = options.make_parser().parse_args(list(train_flags)).amp != "none"
    if bfloat16 and utils.native_bfloat16(utils.cpu_flags()) == "AVX512-BF16":
        print("with AVX512-BF16 (vdpbf16ps: two products per fp32 lane) the bf16 peak is %.0f GFLOP/s: %.1f%% of it"
              % (2 * peak, 50 * flops / 1e9 / seconds / peak))
    print("| part | ms per iteration (profiled) | share |")
    print("| --- | --- | --- |")
    for part, part_seconds in sorted(parts.items(), key=lambda item: -item[1]):
        print("| %s | %.1f | %.1f%% |" % (part, 1000 * part_seconds, 100 * part_seconds / profiled_seconds))


def side_by_side(specs, iterations, rounds):
    """The quickstart run by train.py for `iterations` iterations from each spec ("REV" or
    "REV FLAGS...": a git revision of this repository, "." for the working tree as it is,
    and flags added to the quickstart's), in turn, `rounds` times. Returns, per spec, each
    round's (training iterations per second, seconds per iteration with the scoring),
    both without the first checkpoint period (start-up, compilation)."""
    results = {spec: [] for spec in specs}
    with tempfile.TemporaryDirectory(prefix="redo_side_by_side_") as scratch:
        trees = {spec: source_tree(shlex.split(spec)[0], os.path.join(scratch, "tree%d" % i))
                 for i, spec in enumerate(specs)}
        for _ in range(rounds):
            for spec in specs:
                results[spec].append(quickstart_speed(trees[spec], shlex.split(spec)[1:], iterations,
                                                      tempfile.mkdtemp(dir=scratch)))
                print("%s: %.3f it/s training, %.3f s / it with the scoring" % (spec, *results[spec][-1]),
                      flush=True)
    return results


def source_tree(rev, folder):
    """A folder holding the project at git revision rev ("." : this working tree itself)."""
    if rev == ".":
        return ROOT
    os.makedirs(folder)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def quickstart_speed(tree, flags, iterations, outf):
    """One quickstart run of tree's train.py; see side_by_side."""
    subprocess.run([sys.executable, os.path.join(tree, "train.py"), *QUICKSTART, *flags, "--nIteration",
                    str(iterations), "--manualSeed", "1", "--silent", "--outf", outf], check=True,
                   stdout=subprocess.DEVNULL)
    import monitor
    return speeds_after_the_first_period(monitor.read_stats(os.path.join(outf, monitor.STATS_FILE))[0])


def speeds_after_the_first_period(records):
    """From a run's stats.jsonl records: training iterations per second, and seconds per
    iteration with the scoring, over the periods after the first."""
    if len(records) < 2:
        sys.exit("benchmark: --side-by-side needs two checkpoint periods or more (--iterations)")
    first, rest = records[0], records[1:]
    iterations = rest[-1]["step"] - first["step"]
    return (iterations / sum(r["period_seconds"] for r in rest),
            (rest[-1]["seconds"] - first["seconds"]) / iterations)


def print_side_by_side(results):
    before = next(iter(results))
    print("| quickstart from | training it/s | speed-up | s / it with the scoring | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for spec, rounds in results.items():  # medians of the rounds, speed-ups against the first spec's same round
        print("| %s | %.3f | %.2fx | %.3f | %.2fx |" % (
            spec, statistics.median(r[0] for r in rounds),
            statistics.median(r[0] / b[0] for b, r in zip(results[before], rounds)),
            statistics.median(r[1] for r in rounds),
            statistics.median(b[1] / r[1] for b, r in zip(results[before], rounds))))


def child(args):
    result = measure_iterations(args.one[0], args.one[1], args.one[2], args.iterations, args.device)
    print(json.dumps(result))


def measure_round(config, runs, args):
    """Each (implementation, mode) of runs measured once, one after the other."""
    return {(impl, mode): run_child(config, mode, args.original if impl == "original" else "ours", args)
            for impl, mode in runs}


def run_child(config, mode, impl, args):
    command = [sys.executable, os.path.abspath(__file__), "--one", config, mode, impl,
               "--iterations", str(args.iterations), "--device", args.device]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="small,paper")
    p.add_argument("--modes", default="fp32,bf16,compile")
    p.add_argument("--original", default=None, help="path to a checkout of the original ReDO")
    p.add_argument("--iterations", type=int, default=3, help="timed iterations per measurement (after warm-up)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure the original and ours this many times, back to back, and report medians "
                        "(the speed-up is the median of the rounds' ratios: robust to a shared machine's load)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-data", action="store_true")
    p.add_argument("--data", action="store_true", help="only the data loader's images/s")
    p.add_argument("--logging", metavar="STATS_JSONL", help="only the cost of the statistics log, from a run's log")
    p.add_argument("--tensorboard", action="store_true", help="with --logging: TensorBoard too")
    p.add_argument("--flops", metavar="CONFIG", help="only the operations of one iteration of CONFIG")
    p.add_argument("--profile", metavar="CONFIG", choices=sorted(PROFILED),
                   help="only where an iteration's time goes, on the CPU: %s" % ", ".join(sorted(PROFILED)))
    p.add_argument("--warmup", type=int, default=5, help="with --profile: iterations run before any is timed")
    p.add_argument("--fma-units", type=int, default=2, help="with --profile: FMA units per core, for the peak")
    p.add_argument("--train-flags", default="", help='with --profile: train.py flags added, e.g. "--amp bf16"')
    p.add_argument("--side-by-side", nargs="+", metavar="SPEC",
                   help="only the quickstart's speed from each SPEC, in turn (--rounds, --iterations): a git "
                        "revision, or '.' for the working tree, optionally followed by train.py flags in the same "
                        "argument; speed-ups against the first")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return child(args)
    if args.logging:
        shares = measure_logging(args.logging, args.tensorboard)
        print("%d records: writing one took %.3f s median, %.3f s at most: %.2f%% of its checkpoint period "
              "median, %.2f%% at most" % (len(shares), statistics.median(s for s, _ in shares),
                                         max(s for s, _ in shares), 100 * statistics.median(r for _, r in shares),
                                         100 * max(r for _, r in shares)))
        costs = label_free_costs(args.logging)
        if costs:
            print("the label-free score took %.2f%% of its checkpoint period median, %.2f%% at most"
                  % (100 * statistics.median(costs), 100 * max(costs)))
        return
    if args.data:
        for name, value in measure_data([0, 2, 4]).items():
            print("data loader, %s: %.0f images/s" % (name, value))
        return
    if args.flops:
        print("%s: %.3f TFLOP per training iteration" % (args.flops, measure_flops(args.flops) / 1e12))
        return
    if args.side_by_side:
        return print_side_by_side(side_by_side(args.side_by_side, args.iterations, args.rounds))
    if args.profile:
        return print_profile(args.profile, args.iterations + args.iterations % 2, args.warmup, args.fma_units,
                             shlex.split(args.train_flags))
    print("device %s, torch %s, %d threads" % (args.device, torch.__version__, torch.get_num_threads()))
    print("| configuration | implementation | mode | s / iteration | images / s | peak memory (MB) | speed-up vs original |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    failed = []
    for config in args.configs.split(","):
        runs = ([("original", "fp32")] if args.original else []) + [("ours", m) for m in args.modes.split(",")]
        rounds = [measure_round(config, runs, args) for _ in range(args.rounds)]
        for run in runs:
            results = [r[run] for r in rounds if "error" not in r[run]]
            if not results:
                print("| %s | %s | %s | failed: %s | | | |" % (config, *run, rounds[-1][run]["error"]))
                failed.append("%s %s %s" % (config, *run))
                continue
            ratios = [r[("original", "fp32")]["seconds"] / r[run]["seconds"] for r in rounds
                      if args.original and "error" not in r[run] and "error" not in r[("original", "fp32")]]
            seconds = statistics.median(r["seconds"] for r in results)
            print("| %s (nf=%d, nfX=%d, batch %d) | %s | %s | %.3f | %.2f | %.0f | %s |" % (
                config, CONFIGS[config]["nf"], CONFIGS[config]["nfX"], CONFIGS[config]["batchSize"], *run,
                seconds, CONFIGS[config]["batchSize"] / seconds, max(r["peak_mb"] for r in results),
                "%.2fx" % statistics.median(ratios) if ratios else ""), flush=True)
        ours_fp32 = [r[("ours", "fp32")]["seconds"] for r in rounds if "seconds" in r.get(("ours", "fp32"), {})]
        per_image = measure_evaluation(config, args.device)
        share = ""
        if ours_fp32:
            eval_time = per_image * (6149 + 1020)
            share = ", %.1f%% of a 500-iteration checkpoint period in fp32" % (
                100 * eval_time / (eval_time + 500 * statistics.median(ours_fp32)))
        print("\nevaluate(): %.4f s per image (%s)%s\n" % (per_image, config, share))
    if not args.skip_data:
        for name, value in measure_data([0, 2, 4]).items():
            print("data loader, %s: %.0f images/s" % (name, value))
    if failed:
        sys.exit("benchmark: %d measurement%s failed: %s" % (len(failed), "" if len(failed) == 1 else "s",
                                                            ", ".join(failed)))


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    main()
