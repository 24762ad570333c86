import os

# TVM's runtime.config_threadpool binds the calling thread to core 0 (whatever the process
# affinity); with tests in two worker processes (pytest -n 2) both would share one core.
os.environ.setdefault("TVM_BIND_THREADS", "0")

import pytest
import torch

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
