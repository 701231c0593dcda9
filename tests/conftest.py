"""What the tests share: the project on the path, fixtures (the original's reference files,
the miniature datasets, thread counts), running a script in-process or as a process, and
helpers that compare checkpoints, weights and sample grids."""
import contextlib
import importlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))  # for the tests of the tools

import utils  # noqa: E402
from utils import read_dat  # noqa: E402,F401  (the tests' name for it)


@pytest.fixture(scope="session")
def vectors():
    """Reference vectors produced by running the original implementation (fixtures/README.md)."""
    return torch.load(os.path.join(FIXTURES, "redo_small_vectors.pt"))


@pytest.fixture(scope="session")
def fixture_options():
    return utils.load_checkpoint(os.path.join(FIXTURES, "redo_small_nets_state.pth"))["options"]


TEST_TIMEOUT = 300
"""Seconds a test may take (pytest-timeout) unless it says otherwise: the slowest takes about
a minute on a 2-core AVX2 EPYC."""


def pytest_collection_modifyitems(items):
    """Every test is bounded: a hang fails with its traceback instead of holding the suite."""
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))


def fixture_path(name):
    return os.path.join(FIXTURES, name)


def run_script(script, *args, cwd, check=True, threads=None):
    """Run one of the project's scripts as `python SCRIPT ARGS` from the folder cwd, but in
    this process: its main(argv), with stdout and stderr captured and the exit status and
    message Python would give (a process costs seconds of imports; see run_process).
    threads: torch's thread count during the run; PROCESS_THREADS gives results equal bit
    for bit to run_process's (the rounding of a run depends on it)."""
    module = importlib.import_module(os.path.splitext(script)[0])
    stdout, stderr, returncode = io.StringIO(), io.StringIO(), 0
    before = torch.get_num_threads()
    with _working_directory(cwd), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.set_num_threads(threads or before)
        try:
            module.main([str(a) for a in args])
        except SystemExit as e:  # as the interpreter reports it
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            returncode = e.code if isinstance(e.code, int) else 1
        finally:
            torch.set_num_threads(before)
    result = subprocess.CompletedProcess(script, returncode, stdout.getvalue(), stderr.getvalue())
    return _checked(result, check)


@contextlib.contextmanager
def _working_directory(path):  # contextlib.chdir, from Python 3.11 on
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


PROCESS_THREADS = int(os.environ.get("OMP_NUM_THREADS", "2"))
PROCESS_ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(PROCESS_THREADS))
"""The environment of the scripts' processes: the same thread count in every one of them."""


def run_process(script, *args, cwd, check=True, timeout=600):
    """Run one of the project's scripts in a new Python process, from another working directory."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script)] + [str(a) for a in args], cwd=cwd,
                            capture_output=True, text=True, timeout=timeout, env=PROCESS_ENV)
    return _checked(result, check)


def _checked(result, check):
    if check and result.returncode != 0:
        raise AssertionError("%s failed (%d):\n%s\n%s" % (result.args, result.returncode, result.stdout,
                                                           result.stderr))
    return result


@pytest.fixture(scope="session")
def minidata_root(tmp_path_factory):
    """Miniature datasets, one folder per dataset, built once per test session."""
    import minidata
    root = tmp_path_factory.mktemp("data")
    for name, make in minidata.MAKERS.items():
        make(str(root / name))
    return root


SMALL_RUN = ["--nf", "4", "--batchSize", "2", "--nTest", "2", "--workers", "0", "--device", "cpu", "--silent"]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Run the test with 1, then 2 intra-op threads: sums split over threads round
    differently, and the tolerances must hold whatever the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def original_run_flowers(tmp_path):
    """A copy of the miniature Flowers set the original's recorded runs read (fixtures/README.md):
    the exact JPEG files, so that no other Pillow encoder can change the inputs."""
    return str(shutil.copytree(fixture_path("original_run_flowers"), tmp_path / "original_run_flowers"))


def is_free_bias(key, selfAttG=False):
    """A bias of netGenX that only an instance norm reads: the per-channel bias of each
    generator block's convB and shortcut conv (summed, then normalised by the next block's
    normA or by normOut). Its gradient is zero in exact arithmetic, so Adam (beta1 = 0)
    moves it by about lr a step in the direction of a rounding error: it drifts freely and
    changes no output. With generator self-attention, block 3's output goes through the
    attention first, which a channel bias does change."""
    match = re.fullmatch(r"net\.\d+\.(?:convB\.(\d)|sc\.(\d)\.1)\.bias", key)
    return match is not None and not (selfAttG and "3" in match.groups())


def adam_drift_bound(steps, lr=1e-4, beta2=0.9):
    """How far two Adam runs (beta1 = 0) from the same start can move a weight apart over
    the Adam steps numbered `steps`: step t moves it by at most lr * sqrt((1 - beta2^t) / (1 - beta2))."""
    return 2 * lr * sum(((1 - beta2 ** t) / (1 - beta2)) ** 0.5 for t in steps)


def weight_gaps(state, reference, selfAttG=False):
    """{net: [(key, largest difference, fraction of elements beyond 1e-5, is a weight)]}
    for every tensor of the reference nets except netGenX's free biases."""
    gaps = {}
    for net, ref in reference.items():
        assert list(state[net]) == list(ref), net
        rows = []
        for key, tensor in ref.items():
            if net == "netGenX" and is_free_bias(key, selfAttG):
                continue
            diff = (state[net][key].double() - tensor.double()).abs()
            rows.append((key, diff.max().item(), (diff > 1e-5).double().mean().item(), is_weight(key)))
        gaps[net] = rows
    return gaps


def is_weight(key):
    """A parameter other than a bias. A bias's gradient sums the upstream gradients over every
    pixel, which often nearly cancel: Adam (beta1 = 0) then turns a rounding-level difference
    into an lr-sized step in many of its elements (62% of a 64-element bias of netDX in the
    seeded retrace, on an Intel Xeon), where a weight's elements move alike far less often."""
    return not key.endswith(("weight_u", "weight_v", "bias"))


def assert_weights_retrace(state, reference, bounds, fraction, free_bias_steps, selfAttG=False):
    """Every tensor of every net within its net's bound (`bounds[net]`, set at what was
    measured with a margin); in each weight tensor (is_weight) at most `fraction` of the
    elements beyond 1e-5 (a layer trained differently moves nearly all of its elements);
    netGenX's free biases (is_free_bias) within the Adam drift of the steps numbered
    `free_bias_steps`."""
    for net, rows in weight_gaps(state, reference, selfAttG).items():
        for key, largest, beyond, weight in rows:
            assert largest <= bounds[net], (net, key, largest)
            assert not weight or beyond <= fraction, (net, key, beyond)
    for key, tensor in reference.get("netGenX", {}).items():
        if is_free_bias(key, selfAttG):
            assert (state["netGenX"][key] - tensor).abs().max() <= adam_drift_bound(free_bias_steps), key


def grid_shape(rows, columns, sizex=128, padding=2):
    """(width, height) of a grid of images as torchvision's make_grid lays them out."""
    return (columns * (sizex + padding) + padding, rows * (sizex + padding) + padding)


def grid_size(nTest, nMasks, sizex=128):
    """(width, height) of a training sample grid: nTest + 5 columns, nMasks * (nTest + 1) rows."""
    return grid_shape(nMasks * (nTest + 1), nTest + 5, sizex)


def trained(record):
    """What a stats.jsonl record says of the training itself (not of time, memory or resuming)."""
    return {key: record[key] for key in ("iteration", "step", "losses", "region_sizes", "train_acc", "train_iou",
                                         "val_acc", "val_iou", "label_free")}


def one_line_error(result):
    """The one line a script printed on stderr when it failed, checked to be one line."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="session")
def test_device():
    """The device of the device-sensitive tests: REDO_TEST_DEVICE (cpu by default;
    tools/gpu_check.py sets cuda). On CUDA, TF32 is turned off so that float32 means float32."""
    device = torch.device(os.environ.get("REDO_TEST_DEVICE", "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            pytest.exit("REDO_TEST_DEVICE=%s but CUDA is not available" % device, returncode=2)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return device


def named_tensors(tree, prefix=""):
    """[(name, tensor)] of every tensor in nested dicts, lists and tuples (a checkpoint's
    state dicts and optimizer states), in a fixed order."""
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)]
    if isinstance(tree, dict):
        return [item for k in sorted(tree, key=str) for item in named_tensors(tree[k], "%s.%s" % (prefix, k))]
    if isinstance(tree, (list, tuple)):
        return [item for i, v in enumerate(tree) for item in named_tensors(v, "%s.%d" % (prefix, i))]
    return []


_SAVED_AS_FROM = []  # while not empty: the device torch.save records for every storage


def _recorded_device(storage):
    return _SAVED_AS_FROM[-1] if _SAVED_AS_FROM else None


torch.serialization.register_package(1, _recorded_device, lambda storage, location: None)


def save_as_if_from(device, obj, path):
    """torch.save in the legacy format of PyTorch 1.0, recording every storage as on `device`
    (as the published weights, saved from cuda:0), on a machine that may not have it."""
    _SAVED_AS_FROM.append(device)
    try:
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    finally:
        _SAVED_AS_FROM.pop()


@pytest.fixture(scope="session")
def weights_from_cuda(tmp_path_factory):
    """The fixtures' published-format checkpoints and the original's state_00002.pth, saved as
    from cuda:0: {name: path} for nets.pth, netM.pth, their .tar.gz, and state_00002.pth."""
    folder = tmp_path_factory.mktemp("weights_from_cuda")
    sources = {"nets.pth": "redo_small_nets_state.pth", "netM.pth": "redo_small_netM_state.pth",
               "state_00002.pth": "original_state_00002.pth"}
    paths = {}
    for name, source in sources.items():
        paths[name] = folder / name
        save_as_if_from("cuda:0", utils.load_checkpoint(fixture_path(source)), paths[name])
    for name in ("nets.pth", "netM.pth"):
        paths[name + ".tar.gz"] = folder / (name[:-4] + ".tar.gz")
        with tarfile.open(paths[name + ".tar.gz"], "w:gz") as archive:
            archive.add(paths[name], arcname="redo/" + name)
    return paths


def assert_same_tensors(a, b):
    """The same tensors under the same names (nested state dicts), bit for bit."""
    named_a, named_b = named_tensors(a), named_tensors(b)
    assert [name for name, _ in named_a] == [name for name, _ in named_b]
    assert named_a, "nothing to compare"
    for (name, ta), (_, tb) in zip(named_a, named_b):
        assert torch.equal(ta, tb), name


def assert_same_checkpoint(a, b):
    """Bit for bit: every tensor of every net and optimizer, under the same names."""
    keys = sorted(key for key in a if key.startswith(("net", "optimizer")))
    assert keys == sorted(key for key in b if key.startswith(("net", "optimizer")))
    assert_same_tensors({key: a[key] for key in keys}, {key: b[key] for key in keys})


def force_collapse(path):
    """Make the checkpoint at path collapsed: its mask extractor gives region 0 the whole
    image (the sigmoid of a huge bias). Returns the changed state."""
    state = utils.load_checkpoint(path)
    state["netEncM"]["out.mods.9.bias"].fill_(100.0)
    torch.save(state, path)
    return state
