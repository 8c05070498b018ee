import os

import pytest
import torch

if not torch.cuda.is_available():
    # No GPU (CI): the triton backend's kernels run on CPU tensors in Triton's
    # interpreter, which has to be switched on before featadapt imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU the Triton kernels run the pruning rule's fixed configuration, with
# no autotuning (which would benchmark every configuration at every new shape
# and dtype: longer than a device command may take). The test that exercises
# the autotuner switches it back on; FEATADAPT_AUTOTUNE=1 turns it on for all.
os.environ.setdefault("FEATADAPT_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def true_float32():
    """DESIGN.md §4: float32 is compared with TF32 off (it only matters on a GPU)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous
