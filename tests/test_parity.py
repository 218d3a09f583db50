"""PyTorch vs ONNX Runtime FP32 on the bundled model and real held-out cells (acceptance: 1e-4)."""
import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from wbc_edge.edge.preprocess import Preprocessor
from wbc_edge.bundle import Bundle  # noqa: E402
from wbc_edge.data.datasets import from_image_folder  # noqa: E402
from wbc_edge.edge.runners import OrtRunner  # noqa: E402
from wbc_edge.trainer.checkpoint import load_member  # noqa: E402
from wbc_edge.trainer.loop import predict_torch  # noqa: E402


def test_torch_and_ort_agree_on_real_cells(sample_bundle, sample_dir):
    b = Bundle.load(sample_bundle)
    pp = b.preprocess
    images, _, errors, _ = Preprocessor.for_bundle(b).load(from_image_folder(sample_dir / "cells"))
    assert not errors and len(images) == 330
    expected = predict_torch(load_member(b), images, pp.mean, pp.std)
    with OrtRunner(b.path(b.members[0].onnx)) as runner:
        got = np.concatenate([runner.infer(images[i:i + 64]) for i in range(0, len(images), 64)])
    assert got.shape == (330, len(b.classes))
    assert np.abs(got - expected).max() < 1e-4
    assert np.allclose(got.sum(1), 1, atol=1e-5)  # softmax is inside the graph


def test_deployable_graph_takes_uint8_nhwc_and_carries_metadata(sample_bundle):
    b = Bundle.load(sample_bundle)
    model = onnx.load(str(b.path(b.members[0].onnx)))
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert dims[1:] == [b.preprocess.input_size, b.preprocess.input_size, 3] and isinstance(dims[0], str)
    meta = {p.key: p.value for p in model.metadata_props}
    assert __import__("json").loads(meta["classes"]) == b.classes
    assert out.name == "probs"
