import contextlib
import importlib
import io
import os
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, ROOT)

import utils  # noqa: E402


@pytest.fixture(scope="session")
def vectors():
    """Reference vectors produced by running the original implementation (fixtures/README.md)."""
    return torch.load(os.path.join(FIXTURES, "redo_small_vectors.pt"))


@pytest.fixture(scope="session")
def fixture_options():
    return utils.load_checkpoint(os.path.join(FIXTURES, "redo_small_nets_state.pth"))["options"]


def fixture_path(name):
    return os.path.join(FIXTURES, name)


def run_script(script, *args, cwd, check=True):
    """Run one of the project's scripts as `python SCRIPT ARGS` from the folder cwd, but in
    this process: its main(argv), with stdout and stderr captured and the exit status and
    message Python would give (a process costs 5 s of imports here; see run_process)."""
    module = importlib.import_module(os.path.splitext(script)[0])
    stdout, stderr, returncode = io.StringIO(), io.StringIO(), 0
    with _working_directory(cwd), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module.main([str(a) for a in args])
        except SystemExit as e:  # as the interpreter reports it
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            returncode = e.code if isinstance(e.code, int) else 1
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


def run_process(script, *args, cwd, check=True, timeout=600):
    """Run one of the project's scripts in a new Python process, from another working directory."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, script)] + [str(a) for a in args], cwd=cwd,
                            capture_output=True, text=True, timeout=timeout, env=env)
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
