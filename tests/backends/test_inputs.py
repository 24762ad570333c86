"""What a compiled module accepts as input: numpy arrays, and non-finite values (NaN reads as
0.0 in ``quantize``, so the module and the torch reference agree on it bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.backends.models import SmallCNN

P = torch.ops.ptq


@pytest.fixture(scope="module")
def cnn(tvm_backend):
    gm = torch.fx.symbolic_trace(SmallCNN())
    return gm, tvm_backend.compile(gm, "host", example_inputs=[torch.rand(2, 3, 12, 12)])


def test_numpy_inputs_and_wrong_types(cnn):
    _, cm = cnn
    x = np.random.default_rng(0).random((2, 3, 12, 12), dtype=np.float32)
    assert torch.equal(cm(x)[0], cm(torch.from_numpy(x))[0])
    with pytest.raises(ValueError, match=r"input 0: expected float32\[.*got float64"):
        cm(x.astype(np.float64))
    with pytest.raises(TypeError, match="input 0: expected a torch.Tensor .* got list"):
        cm(x.tolist())


def test_quantize_reads_nan_as_zero_and_saturates_inf():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1.0])
    q = P.quantize.default(x, 0.02, 128, 0, 255, torch.uint8)
    assert q.tolist() == [128, 255, 0, 128, 178]
    q = P.quantize.default(x, 0.02, 300, -128, 127, torch.int8)  # zero point past qmax: clamped
    assert q.tolist() == [127, 127, -128, 127, 127]


def test_non_finite_inputs_equal_the_reference(cnn):
    gm, cm = cnn
    x = torch.rand(3, 3, 12, 12) * 4 - 2
    x[0, :, 3:6, 2:5] = float("nan")
    x[1] = float("nan")
    x[2, 0, 0, :6] = float("inf")
    x[2, 1, 1, :6] = -float("inf")
    want = gm(x)[0]
    assert torch.isfinite(want).all()
    assert torch.equal(cm(x)[0], want)
