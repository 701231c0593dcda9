import os
import sys

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


def run_script(script, *args, cwd, check=True, timeout=600):
    """Run one of the project's scripts as a user would, from another working directory."""
    import subprocess
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, script)] + [str(a) for a in args], cwd=cwd,
                            capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError("%s failed (%d):\n%s\n%s" % (script, result.returncode, result.stdout, result.stderr))
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
