"""Test set-up shared by every test file.

Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set before triton is imported); tests keep their shapes small there.
"""
import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

SLOW = os.environ.get("FMN_SLOW", "0") == "1"


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow test: set FMN_SLOW=1 to run it")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not SLOW:
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module of small tensors: faster there, and no OpenMP
    spin-waits on a shared CPU. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny synthetic dataset (8 identities, 2 cameras, 64x32, with part masks): its root folder."""
    from fmn.data.synthetic import generate

    root = str(tmp_path_factory.mktemp("tiny_synth") / "synth")
    generate(root, num_ids=8, num_cams=2, images_per_id_per_cam=2, height=64, width=32, progress=False)
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """{stages: checkpoint} of a tiny FMN trained in stage 1 only and in both stages."""
    from fmn.cli import main
    from tests.test_engine import TINY

    out = {}
    for epochs2 in (0, 1):
        folder = tmp_path_factory.mktemp(f"run{epochs2}")
        assert main(["train", *TINY, "--data-root", data, "--output", str(folder),
                     "--set", f"train.stage2.epochs={epochs2}"]) == 0
        out[1 + epochs2] = str(folder / "model.pt")
    return out


def load_bench(name: str):
    """bench/<name>.py imported as a fresh module (its main() callable with an argv list)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", os.path.join(root, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
