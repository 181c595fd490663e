import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable is read when a kernel
# is defined, so it must be set before fastce.kernels.triton_ce is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
