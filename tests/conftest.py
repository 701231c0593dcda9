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
